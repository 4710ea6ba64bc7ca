//! Running it in production: the systemd unit, check-config, the control socket's
//! credentials, and bad input on the control socket and the agent-check port.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::Duration,
};

use drain_agent_tests::{
    Lab, TempDir, agent_binary, code_and_text, must, require_root, wait_until,
};

#[test]
fn the_systemd_unit_verifies() {
    let dir = TempDir::new("unit");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/drain-agent.service"
    ))
    .expect("deploy/drain-agent.service");
    // Verify against the binary just built, wherever it is.
    let unit = unit.replace(
        "/usr/local/bin/drain-agent",
        agent_binary().to_str().unwrap(),
    );
    let path = dir.path().join("drain-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// The highest `systemd-analyze security` exposure the shipped unit may have ("OK" is below
/// 5; 3.0 leaves only what the agent's job needs).
const MOST_EXPOSURE: f64 = 3.0;

#[test]
fn the_systemd_unit_scores_3_or_better_in_systemd_analyze_security() {
    let dir = TempDir::new("unit-security");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/drain-agent.service"
    ))
    .expect("deploy/drain-agent.service");
    let path = dir.path().join("drain-agent.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/drain-agent",
            agent_binary().to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let score: f64 = format!("{stdout}{stderr}")
        .lines()
        .find_map(|line| {
            line.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{stdout}{stderr}"));
    // What still costs, so a failure says what to tighten.
    let costs: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with('✗'))
        .collect();
    assert!(
        score <= MOST_EXPOSURE,
        "deploy/drain-agent.service exposure {score} is above {MOST_EXPOSURE}; what still \
         costs:\n{}",
        costs.join("\n")
    );
}

/// Every system call a `SystemCallFilter=` token stands for (groups expanded, nested too).
fn system_calls(token: &str) -> BTreeSet<String> {
    if !token.starts_with('@') {
        return BTreeSet::from([token.to_string()]);
    }
    let listing = must("systemd-analyze", &["syscall-filter", "--no-pager", token]);
    let mut calls = BTreeSet::new();
    for word in listing
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .skip(1)
    // the group's own name
    {
        calls.extend(system_calls(word));
    }
    calls
}

#[test]
fn the_agent_makes_only_system_calls_the_units_filter_allows() {
    let lab = Lab::new();
    // Managed like a service (SO_REUSEPORT, daemonized), so that a handover can start the
    // next version beside it.
    let script = drain_agent_tests::topology::serve_api_script();
    let api_dir = lab.dir.path().join("api");
    std::fs::create_dir_all(&api_dir).unwrap();
    let started = lab
        .node
        .command(&script)
        .args(["start", api_dir.to_str().unwrap(), "8080"])
        .status()
        .unwrap();
    assert!(started.success(), "serve-api.sh start failed");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/drain-agent.service"
    ))
    .expect("deploy/drain-agent.service");
    let (mut allowed, mut denied) = (BTreeSet::new(), BTreeSet::new());
    for filter in unit
        .lines()
        .filter_map(|line| line.strip_prefix("SystemCallFilter="))
    {
        match filter.strip_prefix('~') {
            Some(deny) => deny
                .split_whitespace()
                .for_each(|t| denied.extend(system_calls(t))),
            None => filter
                .split_whitespace()
                .for_each(|t| allowed.extend(system_calls(t))),
        }
    }
    assert!(allowed.contains("bpf") && !allowed.is_empty(), "{unit}");

    let dir = lab.dir.path();
    let socket = dir.join("control.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"eth0\"]\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\
             agent_check_listen = \"0.0.0.0:9500\"\nmetrics_listen = \"127.0.0.1:9477\"\n\
             [[backend]]\nname = \"api\"\nports = [8080]\ndrain_timeout = \"5s\"\n\
             restart = {{ command = [\"/bin/true\"] }}\n\
             health = {{ http = \"http://127.0.0.1:8080/\", timeout = \"10s\" }}\n\
             handover = {{ start = [\"{}\", \"start-beside\", \"{}\", \"8080\"] }}\n",
            socket.display(),
            dir.join("state").display(),
            script.display(),
            api_dir.display()
        ),
    )
    .unwrap();
    let trace = dir.join("agent.strace");
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = lab.node.command_keeping_mounts("strace");
    command
        // Children are followed until they exec: what the agent's own code calls, not the
        // service a handover leaves running (it would keep strace alive).
        .args(["-f", "-b", "execve", "-qq", "-o"])
        .arg(&trace)
        .arg(agent_binary())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut strace = drain_agent_tests::Process::spawn("strace drain-agent", &mut command);
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let cli = |args: &[&str]| {
        Command::new(agent_binary())
            .args(args)
            .arg("--control-socket")
            .arg(&socket)
            .output()
            .unwrap()
    };
    wait_until(Duration::from_secs(20), "the agent under strace", || {
        assert!(strace.running(), "the agent exited:\n{}", agent_log());
        cli(&["status"]).status.success()
    });
    // What the agent does in service: a cycle (drain, restart, HTTP health check, return),
    // a handover (steering, pidfd_getfd, the next version beside the running one), a scrape,
    // an agent check, then SIGTERM.
    let cycle = cli(&["cycle", "api"]);
    assert!(cycle.status.success(), "{cycle:?}\n{}", agent_log());
    let handover = cli(&["handover", "api"]);
    assert!(handover.status.success(), "{handover:?}\n{}", agent_log());
    let scrape = lab
        .node
        .command("curl")
        .args(["-sf", "http://127.0.0.1:9477/metrics"])
        .output()
        .unwrap();
    assert!(scrape.status.success(), "{}", agent_log());
    let answer = lab.node.run(|| {
        let mut stream = std::net::TcpStream::connect("127.0.0.1:9500").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(answer.contains("ready"), "{answer:?}");
    // SIGTERM to the agent itself (strace's child); strace exits with it.
    let tracer = strace.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children")).unwrap();
    let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    strace.wait(Duration::from_secs(20));

    let made: BTreeSet<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let call = line.split_whitespace().nth(1)?;
            let (name, _) = call.split_once('(')?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| name.to_string())
        })
        .collect();
    assert!(made.contains("bpf"), "no bpf(2) in the trace: {made:?}");
    assert!(
        made.contains("pidfd_getfd"),
        "no pidfd_getfd(2) in the trace (the handover's): {made:?}"
    );
    let refused: Vec<&String> = made
        .iter()
        .filter(|call| !allowed.contains(*call) || denied.contains(*call))
        .collect();
    assert!(
        refused.is_empty(),
        "deploy/drain-agent.service's SystemCallFilter would refuse {refused:?} (EPERM)"
    );
}

/// Loads a do-nothing sock_ops program and links it to the cgroup given as argv[1] through a
/// read-only descriptor (bpf(2) by hand: the tests crate has no BPF loader of its own).
const ATTACH_SOCK_OPS: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(321, cmd, buf, 128)  # __NR_bpf on x86_64
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd
code = ctypes.create_string_buffer(bytes.fromhex("b700000001000000" "9500000000000000"))  # r0 = 1; exit
license = ctypes.create_string_buffer(b"GPL")
program = bpf(5, struct.pack("=IIQQIIQII16s", 13, 2, ctypes.addressof(code),  # PROG_LOAD, SOCK_OPS
                             ctypes.addressof(license), 0, 0, 0, 0, 0, b"ro_cgroup_test"))
cgroup = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
bpf(28, struct.pack("=IIII", program, cgroup, 3, 0))  # LINK_CREATE, BPF_CGROUP_SOCK_OPS
print("attached")
"#;

#[test]
fn a_read_only_cgroup_root_takes_a_sock_ops_program_with_the_units_capabilities() {
    // ProtectControlGroups=yes mounts the cgroup tree read-only: attaching must need only a
    // read-only descriptor of the cgroup-v2 root, and the unit's three capabilities.
    require_root();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            (fs.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| fields.get(4).map(|point| point.to_string()))?
        })
        .expect("a cgroup2 mount of the hierarchy's root");
    let dir = TempDir::new("ro-cgroup");
    let script = dir.path().join("attach.py");
    std::fs::write(&script, ATTACH_SOCK_OPS).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -o remount,bind,ro {root} && ! touch {root}/drain-agent-test 2>/dev/null && \
             exec setpriv --bounding-set -all,+bpf,+net_admin,+perfmon --inh-caps -all \
             python3 {} {root}",
            script.display()
        ))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("attached"),
        "attaching to the read-only {root}: {text}"
    );
}

const GOOD: &str = r#"interfaces = ["lo"]
control_socket = "/run/drain-agent-check/control.sock"
agent_check_listen = "0.0.0.0:9500"
metrics_listen = "127.0.0.1:9477"

[[load_balancer]]
name = "lb1"
runtime_api = "unix:/nonexistent/haproxy/admin.sock"

[[backend]]
name = "nova-api"
ports = [8774]
haproxy = { backend = "nova-api", server = "controller" }
drain_timeout = "2m"
on_timeout = "abort"
restart = { systemd_unit = "nova-api.service" }
health = { http = "http://127.0.0.1:8774/", expect = 200, timeout = "60s" }

[[backend]]
name = "placement"
ports = [8778]
"#;

fn check_config(text: &str) -> (Option<i32>, String) {
    check_config_with(&[], text)
}

fn check_config_with(flags: &[&str], text: &str) -> (Option<i32>, String) {
    let dir = TempDir::new("check-config");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(agent_binary())
        .arg("check-config")
        .args(flags)
        .arg(&path)
        .output()
        .unwrap();
    let (code, text) = code_and_text(&out);
    (
        code,
        text.replace(&path.display().to_string(), "agent.toml"),
    )
}

#[test]
fn check_config_names_file_line_and_key_for_each_broken_config() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "interfaces = [\"lo\"]",
            "interfaces = [\"eth9\"]",
            "agent.toml:1: interfaces[0]: interface `eth9` does not exist on this node",
        ),
        (
            "interfaces = [\"lo\"]",
            "interfaces = []",
            "agent.toml:1: interfaces: [] names no interface: list at least one interface",
        ),
        (
            "interfaces = [\"lo\"]",
            "interfaces = \"lo\"",
            "agent.toml:1: interfaces: invalid type: string \"lo\", expected a sequence",
        ),
        (
            "interfaces = [\"lo\"]",
            "interfaces = [\"lo\"]\nquiet_periode = \"50ms\"",
            "agent.toml:2: unknown field `quiet_periode`",
        ),
        (
            "interfaces = [\"lo\"]",
            "interfaces = [\"lo\"]\nquiet_periode = \"50ms\"",
            "did you mean `quiet_period`?",
        ),
        (
            "ports = [8774]",
            "ports = [87740]",
            "agent.toml:12: backend[0].ports[0]: port 87740 is out of range: use 1 to 65535",
        ),
        (
            "ports = [8778]",
            "ports = [8774]",
            "agent.toml:21: backend[1].ports[0]: port 8774 is already used by backend `nova-api`",
        ),
        (
            "ports = [8778]",
            "ports = [8778, 8778]",
            "port 8778 is listed twice for backend `placement`",
        ),
        (
            "name = \"placement\"",
            "name = \"nova-api\"",
            "agent.toml:20: backend[1].name: backend `nova-api` is defined twice",
        ),
        (
            "drain_timeout = \"2m\"",
            "drain_timeout = \"2 fortnights\"",
            "agent.toml:14: backend[0].drain_timeout: \"2 fortnights\" is not a duration (e.g. \"30s\", \"2m\")",
        ),
        (
            "on_timeout = \"abort\"",
            "on_timeout = \"abrot\"",
            "unknown variant `abrot`, expected `abort` or `force`; did you mean `abort`?",
        ),
        (
            "{ systemd_unit = \"nova-api.service\" }",
            "{ systemd_unit = \"x\", command = [\"y\"] }",
            "agent.toml:16: backend[0].restart: give exactly one of",
        ),
        (
            "http = \"http://127.0.0.1:8774/\"",
            "http = \"ftp://127.0.0.1/\"",
            "agent.toml:17: backend[0].health.http: `ftp://127.0.0.1/` must start with http:// or https://",
        ),
        (
            "http = \"http://127.0.0.1:8774/\"",
            "http = \"https://127.0.0.1:8774/\", ca = \"/nonexistent/ca.pem\"",
            "agent.toml:17: backend[0].health.ca: cannot read /nonexistent/ca.pem: No such file or directory",
        ),
        (
            "http = \"http://127.0.0.1:8774/\"",
            "http = \"https://127.0.0.1:8774/\", host = \"api internal\"",
            "agent.toml:17: backend[0].health.host: \"api internal\" is not a host name",
        ),
        (
            "metrics_listen = \"127.0.0.1:9477\"",
            "metrics_listen = \"127.0.0.1:9477\"\nflow_table_size = 12",
            "agent.toml:5: flow_table_size: 12 is out of range: use 1024 to 16777216 connections",
        ),
        (
            "metrics_listen = \"127.0.0.1:9477\"",
            "metrics_listen = \"127.0.0.1:9477\"\nagent_check_interval = \"0s\"",
            "agent.toml:5: agent_check_interval: \"0s\" is not an interval or a timeout",
        ),
        (
            "server = \"controller\"",
            "server = \"controller;disable\"",
            "agent.toml:13: backend[0].haproxy.server: \"controller;disable\" is not an HAProxy name",
        ),
        (
            "\"unix:/nonexistent/haproxy/admin.sock\"",
            "\"admin.sock\"",
            "agent.toml:8: load_balancer[0].runtime_api: `admin.sock` is not a runtime API address",
        ),
        (
            "agent_check_listen = \"0.0.0.0:9500\"",
            "agent_check_listen = \"9500\"",
            "agent.toml:3: agent_check_listen: `9500` is not an address:port",
        ),
        (
            "metrics_listen = \"127.0.0.1:9477\"",
            "metrics_listen = \"127.0.0.1:9500\"",
            "metrics_listen: 127.0.0.1:9500 collides with agent_check_listen",
        ),
        (
            "[[backend]]\nname = \"placement\"\nports = [8778]\n",
            "[[backend]]\nname = \"placement\"\n",
            "backend[1]: missing field `listen`",
        ),
        (
            "name = \"lb1\"",
            "name = \"lb1\"\nname = \"lb2\"",
            "duplicate key",
        ),
        (
            "interfaces = [\"lo\"]",
            "interfaces = [\"lo\"\n",
            "agent.toml:",
        ),
        // The load balancer's socket is not there: a warning (HAProxy may be down), not an error.
    ];
    assert!(cases.len() >= 15);
    for (from, to, expected) in cases {
        assert!(GOOD.contains(from), "{from}");
        let (code, text) = check_config(&GOOD.replacen(from, to, 1));
        assert_eq!(code, Some(2), "{to}: {text}");
        assert!(
            text.contains(expected),
            "{to}: expected {expected:?} in {text:?}"
        );
    }
    // A warning alone is not clean: exit 2, unless --allow-warnings accepts it.
    let warning = "warning: agent.toml:8: load_balancer[0].runtime_api: load balancer lb1: \
                   cannot reach the runtime API";
    let (code, text) = check_config(GOOD);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(warning), "{text}");
    assert!(text.contains("0 error(s), 1 warning(s)"), "{text}");
    let (code, text) = check_config_with(&["--allow-warnings"], GOOD);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(warning), "{text}");
    assert!(text.contains("ok with warnings"), "{text}");
}

#[test]
fn one_check_config_run_names_three_independent_mistakes() {
    let (code, text) = check_config(
        &GOOD
            .replacen("ports = [8774]", "ports = [87740]", 1)
            .replacen(
                "drain_timeout = \"2m\"",
                "drain_timeout = \"2 fortnights\"",
                1,
            )
            .replacen(
                "interfaces = [\"lo\"]",
                "interfaces = [\"lo\"]\nquiet_periode = \"50ms\"",
                1,
            ),
    );
    assert_eq!(code, Some(2), "{text}");
    for expected in [
        "agent.toml:2: unknown field `quiet_periode`",
        "agent.toml:13: backend[0].ports[0]: port 87740 is out of range",
        "agent.toml:15: backend[0].drain_timeout: \"2 fortnights\" is not a duration",
        "3 error(s)",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
}

#[test]
fn a_peer_that_is_not_root_nor_in_the_group_may_read_status_but_not_drain() {
    let lab = Lab::new();
    let _api = lab.start_api(8080);
    let agent = lab.start_agent(
        &[("api", &[8080])],
        "agent_check_listen = \"0.0.0.0:9500\"",
        "ebpf",
    );
    // Only root can reach a 0600 socket; open it up to show the credential check on its own.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the control socket must be 0600 by default");
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(agent_binary())
            .args(args)
            .arg("--control-socket")
            .arg(&agent.socket)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        as_nobody(&["status"]).0,
        Some(0),
        "status is for everyone who can connect"
    );
    let (code, stderr) = as_nobody(&["drain", "api"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "refused: uid 65534 may read status but not drain, cycle, hand over or resume; only root may"
        ),
        "{stderr}"
    );
    assert_eq!(agent.backend("api")["state"], "serving");
}

#[test]
fn garbage_on_the_control_socket_and_the_agent_check_port_gets_an_error() {
    require_root();
    let lab = Lab::new();
    let _api = lab.start_api(8080);
    let mut agent = lab.start_agent(
        &[("api", &[8080])],
        "agent_check_listen = \"0.0.0.0:9500\"",
        "ebpf",
    );
    let garbage: [&[u8]; 5] = [
        b"\n",
        b"{\"command\":\"reboot\"}\n",
        b"\xff\xfe\x00garbage\n",
        &[b'x'; 70_000],
        b"{\"command\":\"drain\"}\n",
    ];
    for bytes in garbage {
        let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(
            answer.contains("\"error\""),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
    }
    let check = SocketAddr::new(drain_agent_tests::NODE_V4.parse().unwrap(), 9500);
    for bytes in garbage {
        let answer = lab.client.run(move || {
            let mut stream = std::net::TcpStream::connect(check).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = stream.write_all(bytes);
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        });
        // One backend: anything that is not a known name gets the state or a comment line,
        // never a command's effect.
        assert!(
            answer == "up\n" || answer == "#unknown backend\n",
            "{answer:?}"
        );
    }
    assert!(agent.process.running(), "the agent died:\n{}", agent.log());
    wait_until(Duration::from_secs(2), "status after garbage", || {
        agent.try_status().is_some()
    });
    assert_eq!(agent.backend("api")["state"], "serving");
}

#[test]
fn control_group_needs_the_group_or_chown_under_the_units_capabilities() {
    let dir = TempDir::new("control-group");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "interfaces = [\"lo\"]\ncontrol_group = \"daemon\"\n[[backend]]\nname = \"api\"\nports = [8774]\n",
    )
    .unwrap();
    // The shipped unit's capability set: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, no CAP_CHOWN.
    let as_the_unit = |groups: &str| {
        let out = Command::new("setpriv")
            .args(["--bounding-set", "-all,+bpf,+net_admin,+perfmon"])
            .args(["--inh-caps", "-all", "--groups", groups])
            .arg(agent_binary())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        code_and_text(&out)
    };
    let (code, text) = as_the_unit("0");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("control_group")
            && text.contains("no CAP_CHOWN")
            && text.contains("SupplementaryGroups=daemon"),
        "{text}"
    );
    // With the group as a supplementary group (the documented drop-in) it passes.
    let (code, text) = as_the_unit("0,1");
    assert!(!text.contains("control_group"), "{code:?}: {text}");
}

#[test]
fn min_serving_without_a_runtime_api_is_refused_in_words() {
    let (code, text) = check_config(
        "interfaces = [\"lo\"]\nagent_check_listen = \"127.0.0.1:9500\"\n\
         [[backend]]\nname = \"api\"\nports = [8774]\nmin_serving = 1\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("backend[0].min_serving")
            && text.contains("agent-check alone the agent cannot see the other servers"),
        "{text}"
    );
    // Without the key, an agent-check-only backend asks for nothing it cannot check.
    let (code, text) = check_config(
        "interfaces = [\"lo\"]\nagent_check_listen = \"127.0.0.1:9500\"\n\
         [[backend]]\nname = \"api\"\nports = [8774]\n",
    );
    assert_eq!(code, Some(0), "{text}");
}
