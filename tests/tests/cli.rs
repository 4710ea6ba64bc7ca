//! The agent binary's answers to bad input: exit codes, messages, and nothing left attached.

use std::{path::Path, process::Command};

use drain_agent_tests::{Lab, TempDir, agent_binary, require_root};

const GOOD: &str = r#"interfaces = ["eth0"]
control_socket = "CONTROL"

[[backend]]
name = "nova-api"
ports = [8774]

[[backend]]
name = "placement"
ports = [8778]
"#;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn run_agent(dir: &Path, config: &str, netns: Option<&str>, wrapper: &[&str]) -> Outcome {
    let socket = dir.join("control.sock");
    let config = config.replace("CONTROL", socket.to_str().unwrap());
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]);
            command.args(wrapper);
            command.arg(agent_binary());
            command
        }
        None if !wrapper.is_empty() => {
            let mut command = Command::new(wrapper[0]);
            command.args(&wrapper[1..]).arg(agent_binary());
            command
        }
        None => Command::new(agent_binary()),
    };
    let out = command
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !socket.exists(),
        "a rejected start must not create the control socket"
    );
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn rejected(config: &str, expected: &str) {
    let dir = TempDir::new("cli");
    let outcome = run_agent(dir.path(), config, None, &[]);
    assert_eq!(
        outcome.code,
        Some(2),
        "exit code; stderr: {}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(expected),
        "expected {expected:?} in:\n{}",
        outcome.stderr
    );
}

#[test]
fn port_out_of_range_exits_2_naming_file_line_and_key() {
    rejected(
        &GOOD.replace("[8774]", "[87740]"),
        "agent.toml:6: backend[0].ports[0]: port 87740 is out of range: use 1 to 65535",
    );
}

#[test]
fn duplicate_port_across_backends_exits_2() {
    rejected(
        &GOOD.replace("[8778]", "[8774]"),
        "agent.toml:10: backend[1].ports[0]: port 8774 is already used by backend `nova-api`",
    );
}

#[test]
fn malformed_config_exits_2_naming_the_line() {
    rejected(
        &GOOD.replace("[8778]", "[8778"),
        "agent.toml:11: invalid array",
    );
}

#[test]
fn unknown_key_exits_2() {
    rejected(
        &GOOD.replace("control_socket", "controll_socket"),
        "agent.toml:2: unknown field `controll_socket`",
    );
}

#[test]
fn unreadable_config_exits_2() {
    let out = Command::new(agent_binary())
        .args(["run", "--config", "/nonexistent/drain-agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/drain-agent.toml: cannot read the config file"),
        "{stderr}"
    );
}

#[test]
fn unknown_interface_exits_2_and_attaches_nothing() {
    let lab = Lab::new();
    let outcome = run_agent(
        lab.dir.path(),
        &GOOD.replace("eth0", "eth9"),
        Some(lab.node.name()),
        &[],
    );
    assert_eq!(outcome.code, Some(2), "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("agent.toml:1: interfaces[0]: interface `eth9` does not exist on this node"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn without_bpf_privileges_the_error_names_what_is_missing() {
    require_root();
    let dir = TempDir::new("cli-unprivileged");
    // The temp dir must be reachable for an unprivileged user.
    let outcome = run_agent(
        dir.path(),
        &GOOD.replace("eth0", "lo"),
        None,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ],
    );
    assert_eq!(outcome.code, Some(1), "{}", outcome.stderr);
    for needle in [
        "eBPF programs could not be loaded",
        "CAP_BPF",
        "--kernel procfs",
    ] {
        assert!(
            outcome.stderr.contains(needle),
            "{needle:?} missing in:\n{}",
            outcome.stderr
        );
    }
}

#[test]
fn status_without_a_running_agent_says_how_to_fix_it() {
    let out = Command::new(agent_binary())
        .args(["status", "--control-socket", "/nonexistent/control.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the agent at /nonexistent/control.sock"),
        "{stderr}"
    );
    assert!(stderr.contains("Is `drain-agent run` running"), "{stderr}");
}

#[test]
fn bad_values_exit_2_naming_file_line_key_value_and_what_is_valid() {
    for (from, to, expected) in [
        (
            "ports = [8774]",
            "ports = [8774]\ndrain_timeout = \"5 parsecs\"",
            "agent.toml:7: backend[0].drain_timeout: \"5 parsecs\" is not a duration (e.g. \"30s\", \"2m\")",
        ),
        (
            "ports = [8774]",
            "ports = [8774]\nhealth = { http = \"https://127.0.0.1:8774/\", host = \"api:443\" }",
            "agent.toml:7: backend[0].health.host: \"api:443\" is not a host name: use the name the service answers to, without a port",
        ),
        (
            "ports = [8774]",
            "ports = [8774]\nhealth = { http = \"http://127.0.0.1:8774/\", ca = \"/etc/ssl/ca.pem\" }",
            "agent.toml:7: backend[0].health.ca: `ca` needs an https:// URL",
        ),
        (
            "ports = [8774]",
            "ports = [8774]\nmin_serving = 2",
            "agent.toml:7: backend[0].min_serving: min_serving = 2 needs `haproxy = { backend, server }`",
        ),
        (
            "interfaces = [\"eth0\"]",
            "interfaces = [\"eth0\"]\nagent_check_max_connections = -1",
            "agent.toml:2: agent_check_max_connections: -1 is out of range: use 1 to 65536",
        ),
    ] {
        assert!(GOOD.contains(from), "{from}");
        rejected(&GOOD.replacen(from, to, 1), expected);
    }
}

#[test]
fn run_without_config_reads_etc_drain_agent_config_toml() {
    require_root();
    // A private mount namespace with its own /etc, so the host's is neither read nor touched.
    let script = format!(
        "mount -t tmpfs tmpfs /etc && mkdir /etc/drain-agent && printf '%s' '{}' > \
         /etc/drain-agent/config.toml && exec {} run",
        GOOD.replace("[8774]", "[87740]")
            .replace("CONTROL", "/run/drain-agent-test/control.sock"),
        agent_binary().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "/etc/drain-agent/config.toml:6: backend[0].ports[0]: port 87740 is out of range"
        ),
        "{stderr}"
    );
}
