//! What an on-call operator relies on: Ctrl-C on a waiting drain and `wait` to follow it
//! again, a second agent on the same interface refused, and `check-config --online`
//! against a real HAProxy.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use drain_agent_tests::{
    Lab, Netns, Process, TempDir, agent_binary, code_and_text, require_root, two_lbs::tier,
    wait_until,
};

#[test]
fn ctrl_c_on_drain_wait_leaves_the_drain_running_and_wait_reports_its_end() {
    let tier = tier("drain_timeout = \"30s\"");
    let agent = &tier.agents[0];
    // A request in flight keeps the drain going for 3 s.
    let slow = tier.slow_request_to_node1(3000);
    std::thread::sleep(Duration::from_millis(300));
    let drain = Command::new(agent_binary())
        .args(["drain", "api", "--wait", "--control-socket"])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    agent.wait_backend("api", Duration::from_secs(10), "draining", |backend| {
        backend["state"] == "draining"
    });
    let interrupted_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(drain.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let interrupted = drain.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&interrupted.stderr);
    assert_eq!(interrupted.status.code(), Some(130), "{stderr}");
    for words in [
        "the drain of `api` goes on in the agent",
        "`drain-agent wait api` follows it to its end",
    ] {
        assert!(stderr.contains(words), "{words:?} missing in {stderr}");
    }
    assert_eq!(
        agent.backend("api")["state"],
        "draining",
        "Ctrl-C stopped the drain"
    );

    // `wait` re-attaches to the same drain and reports its end; so does `drain --wait` on
    // the drain already running (it does not start another, nor is it refused).
    let reattached = agent.cli_in_background(&["drain", "api", "--wait", "--json"]);
    let waited = agent.cli(&["wait", "api", "--json"]);
    assert_eq!(waited.code, Some(0), "{waited:?}");
    let report = waited.json();
    assert_eq!(report["operation"], "drain", "{report}");
    assert_eq!(report["outcome"], "ok", "{report}");
    assert_eq!(report["phase"], "drained", "{report}");
    let reattached = reattached.join().unwrap();
    assert_eq!(reattached.code, Some(0), "{reattached:?}");
    assert_eq!(reattached.json(), report);
    assert_eq!(slow.join().unwrap(), 200);
    assert!(
        waited.finished >= interrupted_at + Duration::from_millis(1500),
        "wait returned before the drain could end"
    );
    // The drain under way since before Ctrl-C: at its start the slow request was in flight.
    assert!(
        report["at_drain_start"]["in_flight"].as_u64() >= Some(1),
        "{report}"
    );

    // Once it ended, `wait` (and `drain --wait` is not needed) gives the same report again.
    let again = agent.cli(&["wait", "api", "--json"]);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!(again.json(), report);
    let unknown = agent.cli(&["wait", "nope", "--json"]);
    assert_eq!(unknown.code, Some(2), "{unknown:?}");
    assert_eq!(unknown.json()["outcome"], "config-error", "{unknown:?}");
}

#[test]
fn a_second_agent_on_the_same_interface_is_refused_naming_the_first() {
    let lab = Lab::new();
    let first = lab.start_agent(&[("api", &[8774])], "", "ebpf");
    let dir = TempDir::new("second-agent");
    let config = dir.path().join("second.toml");
    let stderr = lab.refused_second_agent(dir.path(), "eth0", &dir.path().join("state"));
    let named = format!(
        "drain-agent pid {} (config {}) already watches interface `eth0`",
        first.process.pid(),
        first.config.display()
    );
    assert!(stderr.contains(&named), "{named:?} missing in {stderr}");
    // The first one is untouched; the same interface name in another namespace is another
    // interface.
    assert_eq!(first.backend("api")["state"], "serving");
    let other = Lab::new();
    let elsewhere = other.start_agent(&[("api", &[8774])], "", "ebpf");
    assert_eq!(elsewhere.backend("api")["state"], "serving");

    // check-config --online says the same before anyone tries.
    let checked = lab
        .node
        .command_keeping_mounts(agent_binary())
        .args(["check-config", "--online"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains(&named), "{stdout}");
}

#[test]
fn check_config_online_names_a_user_level_socket_a_missing_server_a_port_mismatch_and_a_missing_restart_command()
 {
    require_root();
    let dir = TempDir::new("check-online");
    let netns = Netns::create(format!("da-check-{}", std::process::id()));
    let user = dir.path().join("user.sock");
    let admin = dir.path().join("admin.sock");
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n    stats socket {} level user\n    stats socket {} level admin\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    \
             timeout server 1s\n\
             backend api\n    server node1 127.0.0.1:18774\n    server node2 127.0.0.1:18775\n",
            user.display(),
            admin.display()
        ),
    )
    .unwrap();
    let mut command = netns.command("haproxy");
    command
        .args(["-db", "-f"])
        .arg(&haproxy_cfg)
        .stdout(Stdio::null());
    let _haproxy = Process::spawn("haproxy", &mut command);
    wait_until(Duration::from_secs(10), "HAProxy's sockets", || {
        user.exists() && admin.exists()
    });
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"lo\"]\n\
             [[load_balancer]]\nname = \"lb-user\"\nruntime_api = \"unix:{}\"\n\
             [[load_balancer]]\nname = \"lb-admin\"\nruntime_api = \"unix:{}\"\n\
             [[backend]]\nname = \"api\"\nports = [18774]\n\
             haproxy = {{ backend = \"api\", server = \"node1\" }}\n\
             restart = {{ command = [\"no-such-restart-tool\", \"api\"] }}\n\
             [[backend]]\nname = \"other\"\nports = [9999]\n\
             haproxy = {{ backend = \"api\", server = \"node2\" }}\n\
             [[backend]]\nname = \"ghost\"\nports = [18776]\n\
             haproxy = {{ backend = \"api\", server = \"node9\" }}\n",
            user.display(),
            admin.display()
        ),
    )
    .unwrap();
    let check = |args: &[&str]| {
        let out = netns
            .command(agent_binary())
            .arg("check-config")
            .args(args)
            .arg(&config)
            .output()
            .unwrap();
        code_and_text(&out)
    };
    let (code, text) = check(&["--online"]);
    assert_eq!(code, Some(2), "{text}");
    for words in [
        "load_balancer[0].runtime_api: load balancer lb-user: the runtime API at unix:",
        "answers, but not at `level admin`",
        "backend[2].haproxy: load balancer lb-admin: HAProxy has no server `node9` in backend `api`",
        "backend[1].haproxy: load balancer lb-admin: HAProxy sends server `node2` of backend `api` to port 18775, which is not one of backend `other`'s ports [9999]",
        "backend[0].restart: backend `api`'s restart: command `no-such-restart-tool` is not found in PATH",
    ] {
        assert!(text.contains(words), "{words:?} missing in:\n{text}");
    }
    // The server that is right raises nothing.
    assert!(!text.contains("server `node1`"), "{text}");
    // Offline, only what the file and the load balancers' names say.
    let (code, text) = check(&[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no server `node9`"), "{text}");
    assert!(!text.contains("level admin"), "{text}");
    assert!(!text.contains("no-such-restart-tool"), "{text}");
}
