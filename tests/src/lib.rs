//! Harness for drain-agent's privileged integration tests: network namespaces joined by veth,
//! a real HTTP API server (gunicorn), the real agent binary, and real TCP/HTTP clients.
//!
//! Everything a test creates is owned by a guard that removes it on drop, also when the test
//! panics. Tests panic with context instead of returning errors, so a failure points at a line.

pub mod agent_check_only;
pub mod booted;
pub mod demo;
pub mod fleet;
pub mod http;
pub mod kernels;
pub mod lab;
pub mod load;
pub mod package;
pub mod soak;
pub mod tier;
pub mod timeline;
pub mod topology;
pub mod two_lbs;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The node's addresses inside every lab (the lab's own namespaces; nothing outside sees them).
pub const NODE_V4: &str = "198.18.0.2";
pub const CLIENT_V4: &str = "198.18.0.1";
pub const NODE_V6: &str = "2001:db8:da::2";
pub const CLIENT_V6: &str = "2001:db8:da::1";

/// "PID-N", unique within and across test processes: every namespace and directory a test
/// creates is named with one. One counter for all of them, because `Netns::create` removes a
/// namespace of the same name first (a crashed run's leftover), so two counters that both
/// start at 0 let one test delete another's namespace (`da-client-PID-0` of a lab and of a
/// topology).
pub fn unique_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails the test unless it runs as root: these tests load BPF programs and create namespaces.
/// They never skip, in CI or elsewhere: a skipped privileged test would hide a regression.
pub fn require_root() {
    let uid = nix::unistd::geteuid();
    assert!(
        uid.is_root(),
        "this test needs root (BPF, network namespaces); run it with `cargo xtask test` as root"
    );
}

/// The agent binary: $DRAIN_AGENT_BIN (set by `cargo xtask test`) or target/release.
pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("DRAIN_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/drain-agent"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: build it with `cargo xtask build` (or run `cargo xtask test`)",
        path.display()
    );
    path.canonicalize().unwrap_or(path)
}

/// Runs a command to completion and returns its output.
pub fn command_output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot start {program} {args:?}: {err}"))
}

/// A command's exit code and everything it printed (stdout, then stderr), for tests that
/// look for words wherever the command put them.
pub fn code_and_text(out: &Output) -> (Option<i32>, String) {
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a command that must succeed.
pub fn must(program: &str, args: &[&str]) -> String {
    let out = command_output(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A directory at a fixed path (emptied first), removed on drop.
    pub fn at(path: PathBuf) -> TempDir {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create dir");
        TempDir(path)
    }

    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("drain-agent-{tag}-{}", unique_id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        Process {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its standard output, when it was spawned with `Stdio::piped()`.
    pub fn stdout(&mut self) -> Option<&mut std::process::ChildStdout> {
        self.child.stdout.as_mut()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal (e.g. SIGKILL to simulate a crash) without reaping.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .unwrap_or_else(|err| panic!("cannot signal {}: {err}", self.name));
    }

    /// Waits for it to exit.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace; on drop every process in it is killed and the namespace deleted
/// (which deletes its veth end too).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: String) -> Netns {
        // Leftover from a crashed run with the same pid: remove it first.
        let _ = command_output("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        must("ip", &full)
    }

    /// Sets a sysctl of this namespace (`net.*` settings are per namespace), e.g.
    /// `net.core.somaxconn=65535`.
    pub fn sysctl(&self, setting: &str) {
        must(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-qw", setting],
        );
    }

    /// A veth pair: `local` in this namespace, `eth0` in `peer`.
    pub fn add_veth(&self, local: &str, peer: &Netns) {
        self.ip(&[
            "link", "add", local, "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
        ]);
    }

    /// Addresses `eth0` (IPv6 without duplicate address detection, so it is usable at once)
    /// and brings it up.
    pub fn up_eth0(&self, v4: impl std::fmt::Display, v6: impl std::fmt::Display) {
        self.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        self.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        self.ip(&["link", "set", "eth0", "up"]);
    }

    /// A command that runs in the namespace's network stack only, with the host's mounts:
    /// `nsenter`, not `ip netns exec`, which remounts /sys and so hides the cgroup-v2 mount
    /// the agent attaches its sock_ops program to.
    pub fn command_keeping_mounts(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program)
            .stdin(Stdio::null());
        command
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.name, program)
    }

    /// Runs `f` on a thread that lives in this namespace: sockets it creates belong here and
    /// can be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        let thread = std::thread::spawn(move || {
            enter_netns(&name);
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = command_output("ip", &["netns", "pids", &self.name]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = command_output("kill", &["-9", pid]);
        }
        let _ = command_output("ip", &["netns", "del", &self.name]);
    }
}

/// A command that runs inside network namespace `name` (`ip netns exec`).
pub fn netns_command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", name])
        .arg(program)
        .stdin(Stdio::null());
    command
}

/// Moves the calling thread into network namespace `name` (sockets it opens belong there).
pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|err| panic!("setns {path}: {err}"));
}

/// A client host and an API node joined by a veth pair (eth0 on both sides), IPv4 and IPv6.
pub struct Lab {
    pub dir: TempDir,
    pub client: Netns,
    pub node: Netns,
}

impl Lab {
    pub fn new() -> Lab {
        require_root();
        let id = unique_id();
        let client = Netns::create(format!("da-client-{id}"));
        let node = Netns::create(format!("da-node-{id}"));
        client.add_veth("eth0", &node);
        for (netns, v4, v6) in [(&client, CLIENT_V4, CLIENT_V6), (&node, NODE_V4, NODE_V6)] {
            netns.up_eth0(v4, v6);
        }
        Lab {
            dir: TempDir::new("lab"),
            client,
            node,
        }
    }

    /// Starts the test API (gunicorn, gthread workers, long keep-alive) on `port`, IPv4 and
    /// IPv6, and waits until it answers.
    pub fn start_api(&self, port: u16) -> Process {
        let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("app");
        let log = File::create(self.dir.path().join(format!("gunicorn-{port}.log"))).unwrap();
        let mut command = self.node.command("/usr/bin/python3");
        command
            .args([
                "-m",
                "gunicorn",
                "--worker-class",
                "gthread",
                "--workers",
                "2",
            ])
            .args([
                "--threads",
                "64",
                "--keep-alive",
                "300",
                "--backlog",
                "4096",
            ])
            .args(["--bind", &format!("[::]:{port}"), "--chdir"])
            .arg(&app_dir)
            .arg("api:app")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let process = Process::spawn("gunicorn", &mut command);
        let addr = SocketAddr::new(NODE_V4.parse().unwrap(), port);
        wait_until(Duration::from_secs(15), "the API server to answer", || {
            self.client.run(move || {
                http::Connection::connect(addr)
                    .and_then(|mut connection| connection.get("/"))
                    .is_ok_and(|response| response.status == 200)
            })
        });
        process
    }

    /// Writes an agent config watching eth0 with the given backends (`name`, ports) and
    /// `extra` top-level TOML, starts the agent in the node namespace, and waits until its
    /// control socket answers.
    pub fn start_agent(&self, backends: &[(&str, &[u16])], extra: &str, kernel: &str) -> Agent {
        let mut agent = self.spawn_agent(backends, extra, kernel, &[]);
        agent.wait_ready();
        agent
    }

    /// [`Lab::start_agent`] with extra environment variables, returning as soon as the
    /// process runs (before its programs are attached): [`Agent::wait_ready`] waits for it.
    pub fn spawn_agent(
        &self,
        backends: &[(&str, &[u16])],
        extra: &str,
        kernel: &str,
        env: &[(&str, &str)],
    ) -> Agent {
        let socket = self.dir.path().join("control.sock");
        let mut config = format!(
            "interfaces = [\"eth0\"]\ncontrol_socket = \"{}\"\n{extra}\n",
            socket.display()
        );
        for (name, ports) in backends {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            config.push_str(&format!(
                "[[backend]]\nname = \"{name}\"\nports = [{}]\n",
                ports.join(", ")
            ));
        }
        spawn_agent_in(&self.node, self.dir.path(), &config, kernel, env)
    }

    /// Opens a TCP connection from the client namespace.
    pub fn connect(&self, addr: SocketAddr) -> http::Connection {
        self.client
            .run(move || http::Connection::connect(addr))
            .unwrap_or_else(|err| panic!("connect to {addr}: {err}"))
    }

    /// Established TCP connections on local port `port` in the node namespace, per `ss`.
    pub fn ss_established(&self, port: u16) -> usize {
        let filter = format!("( sport = :{port} )");
        let mut command = self.node.command("ss");
        command.args(["-Htn", "state", "established", &filter]);
        let out = command.output().expect("run ss");
        assert!(out.status.success(), "ss failed");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// The node's address in the given family.
    pub fn node_addr(v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 { NODE_V6 } else { NODE_V4 }.parse().unwrap();
        SocketAddr::new(ip, port)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Lab {
    /// Runs a second agent in the node namespace with one backend (`other`, port 9000) on
    /// `interface` and `state_dir`, its config in DIR/second.toml, which must be refused:
    /// asserts exit 3 and that it never served its control socket; returns its stderr.
    pub fn refused_second_agent(&self, dir: &Path, interface: &str, state_dir: &Path) -> String {
        let config = dir.join("second.toml");
        std::fs::write(
            &config,
            format!(
                "interfaces = [\"{interface}\"]\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 [[backend]]\nname = \"other\"\nports = [9000]\n",
                dir.join("control.sock").display(),
                state_dir.display()
            ),
        )
        .unwrap();
        let mut second = self
            .node
            .command_keeping_mounts(agent_binary())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // An agent that is not refused runs until stopped: give it ten seconds, not forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while second.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = second.kill();
        let out = second.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "not refused: {stderr}");
        assert!(
            !dir.join("control.sock").exists(),
            "the refused agent must not serve"
        );
        stderr
    }
}

/// Writes `config` (which must set `control_socket` to DIR/control.sock) to DIR/agent.toml,
/// starts `drain-agent run` in `netns`, and waits until its control socket answers.
pub fn start_agent_with_config(netns: &Netns, dir: &Path, config: &str) -> Agent {
    start_agent_with_config_and_env(netns, dir, config, &[])
}

/// [`start_agent_with_config`] with extra environment variables (the agent's test hooks).
pub fn start_agent_with_config_and_env(
    netns: &Netns,
    dir: &Path,
    config: &str,
    env: &[(&str, &str)],
) -> Agent {
    let mut agent = spawn_agent_in(netns, dir, config, "ebpf", env);
    agent.wait_ready();
    agent
}

fn spawn_agent_in(
    netns: &Netns,
    dir: &Path,
    config: &str,
    kernel: &str,
    env: &[(&str, &str)],
) -> Agent {
    let socket = dir.join("control.sock");
    let config_path = dir.join("agent.toml");
    // The journal stays in the test's directory (top-level keys come before any table).
    let config = if config.contains("state_dir") {
        config.to_string()
    } else {
        format!("state_dir = \"{}\"\n{config}", dir.join("state").display())
    };
    std::fs::write(&config_path, config).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Agent {
        process: spawn_agent(netns, &config_path, &dir.join("agent.log"), kernel, &env),
        socket,
        config: config_path,
        log: dir.join("agent.log"),
        netns: netns.name().to_string(),
        kernel: kernel.to_string(),
        env,
    }
}

/// `drain-agent run` in `netns`, its output appended to `log`.
fn spawn_agent(
    netns: &Netns,
    config: &Path,
    log: &Path,
    kernel: &str,
    env: &[(String, String)],
) -> Process {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = netns.command_keeping_mounts(agent_binary());
    command
        .args(["run", "--kernel", kernel, "--config"])
        .arg(config)
        .env("RUST_LOG", "debug")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    Process::spawn("drain-agent", &mut command)
}

/// A running agent.
pub struct Agent {
    pub process: Process,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    netns: String,
    kernel: String,
    /// Extra environment of the process (tests' switches), kept across restarts.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Waits until the agent's control socket answers (its programs are attached by then).
    pub fn wait_ready(&mut self) {
        wait_until(
            Duration::from_secs(10),
            "the agent's control socket",
            || {
                assert!(self.process.running(), "the agent exited:\n{}", self.log());
                self.try_status().is_some()
            },
        );
    }

    /// SIGKILL, then the same config again with `--kernel MODE` ("ebpf" or "procfs").
    pub fn restart_in_mode(&mut self, kernel: &str) -> Instant {
        self.kernel = kernel.to_string();
        self.kill_and_restart()
    }

    /// What systemd's `Restart=on-failure` does after a crash: SIGKILL, then the same agent
    /// with the same config (and journal) again. Returns when its control socket answers.
    pub fn kill_and_restart(&mut self) -> Instant {
        self.process.signal(nix::sys::signal::Signal::SIGKILL);
        self.process.wait(Duration::from_secs(5));
        let netns = Netns {
            name: self.netns.clone(),
        };
        let started = Instant::now();
        self.process = spawn_agent(&netns, &self.config, &self.log, &self.kernel, &self.env);
        // The namespace belongs to its creator: do not delete it when this handle goes.
        std::mem::forget(netns);
        self.wait_ready();
        started
    }

    /// `drain-agent status --json`, parsed; `None` if the agent does not answer.
    pub fn try_status(&self) -> Option<Value> {
        let out = Command::new(agent_binary())
            .args(["status", "--json", "--control-socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("the agent does not answer status:\n{}", self.log()))
    }

    /// One backend's entry in `status --json`.
    pub fn backend(&self, name: &str) -> Value {
        let status = self.status();
        status["backends"]
            .as_array()
            .and_then(|backends| backends.iter().find(|b| b["name"] == name).cloned())
            .unwrap_or_else(|| panic!("backend {name} missing from status: {status}"))
    }

    /// Polls a backend's status until `condition` holds and returns it; panics with the last
    /// status seen after `timeout`.
    pub fn wait_backend(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let backend = self.backend(name);
            if condition(&backend) {
                return backend;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last status: {backend}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A numeric field of a backend (panics on null).
    pub fn count(&self, backend: &str, field: &str) -> u64 {
        let entry = self.backend(backend);
        entry[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{backend}.{field} is not a number: {entry}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `drain-agent ARGS --control-socket SOCKET` (a CLI command against this agent).
    pub fn cli(&self, args: &[&str]) -> CliOutcome {
        run_cli(&self.socket, args)
    }

    /// The same, on a thread: for commands that wait (`drain --wait`, `cycle`) while the
    /// test does something else.
    pub fn cli_in_background(&self, args: &[&str]) -> std::thread::JoinHandle<CliOutcome> {
        let socket = self.socket.clone();
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&socket, &args)
        })
    }
}

fn run_cli(socket: &Path, args: &[&str]) -> CliOutcome {
    let out = Command::new(agent_binary())
        .args(args)
        .arg("--control-socket")
        .arg(socket)
        .output()
        .expect("run drain-agent");
    CliOutcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        finished: Instant::now(),
    }
}

/// What a CLI command printed and returned.
#[derive(Debug)]
pub struct CliOutcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// When the command exited: for commands run in the background, when it really returned.
    pub finished: Instant,
}

impl CliOutcome {
    /// The JSON printed on stdout (for `--json` commands).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {self:?}"))
    }
}

/// A packet socket (`AF_PACKET`, `SOCK_RAW`: whole frames, Ethernet header first) bound to
/// `interface` of the calling thread's namespace, for frames of EtherType `protocol`
/// (`ETH_P_ALL` for every one).
pub fn packet_socket(interface: &str, protocol: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let protocol = protocol.to_be();
    // SAFETY: plain system calls; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just created and is owned by nothing else.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {interface}");
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as i32;
    // SAFETY: a valid socket and a sockaddr_ll of the right size.
    let bound = unsafe {
        libc::bind(
            fd,
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        bound,
        0,
        "bind to {interface}: {}",
        std::io::Error::last_os_error()
    );
    socket
}
