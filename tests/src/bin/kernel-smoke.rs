//! The kernel matrix's smoke suite (`cargo xtask kernels`, docs/troubleshooting.md#kernels):
//! run as the test of a booted kernel (from the initramfs's init), or in a fresh network
//! namespace on the running kernel. It starts the agent on a one-backend node with a gate and
//! a handover, and checks what an operator relies on: the programs load, an idle keep-alive
//! connection counts idle, a slow request counts in flight and holds `drain --wait`, the gate
//! refuses a new connection, the handover moves the port to a new version, status answers.
//! A feature the kernel cannot run must be refused by name (status and the command's error).
//!
//! Each check prints one line, `KERNEL-SMOKE {json}`, which the matrix reads from the console.
//!
//! `kernel-smoke run --prefix P --agent BIN --dir DIR` runs the suite;
//! `kernel-smoke serve VERSION` is the API service it starts (and the handover starts again).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The service's port, on the node's addresses.
const PORT: u16 = 8080;
const NODE: &str = "10.77.0.1";
const CLIENT: &str = "10.77.0.2";
/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_secs(4);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).map_or("1", String::as_str)),
        Some("run") => {
            let flag = |name: &str| {
                args.iter()
                    .position(|arg| arg == name)
                    .and_then(|at| args.get(at + 1))
                    .cloned()
                    .unwrap_or_else(|| usage())
            };
            let smoke = Smoke {
                prefix: flag("--prefix"),
                agent: PathBuf::from(flag("--agent")),
                dir: PathBuf::from(flag("--dir")),
                me: std::env::current_exe().expect("own path"),
            };
            smoke.run();
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: kernel-smoke run --prefix P --agent DRAIN_AGENT --dir DIR | kernel-smoke serve VERSION"
    );
    std::process::exit(2);
}

/// The API service: HTTP/1.1 keep-alive on PORT (SO_REUSEPORT, so a new version can listen
/// beside it); `/slow` answers after SLOW; every answer names the version.
fn serve(version: &str) -> ! {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let addr: SocketAddr = format!("0.0.0.0:{PORT}").parse().unwrap();
    socket.bind(&addr.into()).expect("bind the service port");
    socket.listen(128).expect("listen");
    let listener: TcpListener = socket.into();
    for stream in listener.incoming().flatten() {
        let version = version.to_string();
        thread::spawn(move || answer(stream, &version));
    }
    std::process::exit(0);
}

fn answer(stream: TcpStream, version: &str) {
    let mut writer = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        if request_line.contains(" /slow") {
            thread::sleep(SLOW);
        }
        let body = format!("version {version}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

struct Smoke {
    prefix: String,
    agent: PathBuf,
    dir: PathBuf,
    me: PathBuf,
}

/// One check's outcome, as the matrix reads it.
fn report(check: &str, result: &str, detail: impl Into<String>) {
    let line = json!({ "check": check, "result": result, "detail": detail.into() });
    println!("KERNEL-SMOKE {line}");
}

fn pass(check: &str, detail: impl Into<String>) {
    report(check, "pass", detail);
}

fn fail(check: &str, detail: impl Into<String>) {
    report(check, "fail", detail);
}

/// Processes and links the suite made, removed in any case.
struct Cleanup {
    children: Vec<Child>,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Every copy of the service (the handover's new version is not our child).
        let _ = Command::new("pkill")
            .args(["-f", "kernel-smoke serve"])
            .status();
        let _ = ip(&["netns", "del", &format!("{}client", self.prefix)]);
        let _ = ip(&["link", "del", &format!("{}s", self.prefix)]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| format!("ip {}: {err}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Smoke {
    fn client_netns(&self) -> String {
        format!("/run/netns/{}client", self.prefix)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn run(&self) {
        let mut cleanup = Cleanup {
            children: Vec::new(),
            prefix: self.prefix.clone(),
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        report("kernel", "pass", release.trim());
        if let Err(err) = self.network() {
            fail("network", err);
            return;
        }
        std::fs::create_dir_all(&self.dir).expect("create the smoke's directory");
        let config = self.dir.join("agent.toml");
        std::fs::write(&config, self.config()).expect("write the config");
        match Command::new(&self.me).args(["serve", "1"]).spawn() {
            Ok(child) => cleanup.children.push(child),
            Err(err) => return fail("service", err.to_string()),
        }
        let log = self.dir.join("agent.log");
        let agent = Command::new(&self.agent)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn();
        match agent {
            Ok(child) => cleanup.children.push(child),
            Err(err) => return fail("load", err.to_string()),
        }
        let Some(status) = self.wait_status(Duration::from_secs(30), |_| true) else {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            fail(
                "load",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            );
            return;
        };
        let feature = |name: &str| -> String {
            status["features"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|feature| feature["feature"] == name)
                .map(|feature| {
                    let state = feature["state"].as_str().unwrap_or("?").to_string();
                    match feature["detail"].as_str() {
                        Some(detail) => format!("{state}: {detail}"),
                        None => state,
                    }
                })
                .unwrap_or_else(|| "missing".to_string())
        };
        let (accounting, gate, handover) =
            (feature("accounting"), feature("gate"), feature("handover"));
        if accounting == "active" {
            pass("load", "accounting active");
        } else {
            fail("load", format!("accounting {accounting}"));
            return;
        }
        report("feature gate", "pass", &gate);
        report("feature handover", "pass", &handover);
        self.accounting_drain_and_gate(gate == "active", &gate);
        self.handover(handover == "active", &handover);
        match self.status() {
            Some(_) => pass("status", "answers"),
            None => fail("status", "no answer on the control socket"),
        }
    }

    /// A veth pair: the node's end here, the client's in a namespace of its own.
    fn network(&self) -> Result<(), String> {
        let (node, client, netns) = (
            format!("{}s", self.prefix),
            format!("{}c", self.prefix),
            format!("{}client", self.prefix),
        );
        ip(&["link", "set", "lo", "up"])?;
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &node, "type", "veth", "peer", "name", &client,
        ])?;
        ip(&["link", "set", &client, "netns", &netns])?;
        ip(&["addr", "add", &format!("{NODE}/24"), "dev", &node])?;
        ip(&["link", "set", &node, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            &client,
        ])?;
        ip(&["-n", &netns, "link", "set", &client, "up"])?;
        Ok(())
    }

    fn config(&self) -> String {
        format!(
            "interfaces = [\"{prefix}s\"]\n\
             control_socket = \"{socket}\"\n\
             state_dir = \"{state}\"\n\
             [[backend]]\n\
             name = \"api\"\n\
             ports = [{PORT}]\n\
             drain_timeout = \"30s\"\n\
             gate = {{ allow = [\"192.0.2.0/24\"] }}\n\
             health = {{ http = \"http://127.0.0.1:{PORT}/\", timeout = \"30s\" }}\n\
             handover = {{ start = [\"/bin/sh\", \"-c\", \"{me} serve 2 >/dev/null 2>&1 &\"], timeout = \"30s\" }}\n",
            prefix = self.prefix,
            socket = self.socket().display(),
            state = self.dir.join("state").display(),
            me = self.me.display(),
        )
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.agent);
        command
            .args(args)
            .arg("--control-socket")
            .arg(self.socket())
            .stdin(Stdio::null());
        command
    }

    fn status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn wait_status(&self, within: Duration, until: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.status()
                && until(&status)
            {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `work` in the client's network namespace, on a thread of its own (which `setns`
    /// moves there).
    fn spawn_in_client<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let netns = self.client_netns();
        thread::spawn(move || {
            let file = std::fs::File::open(&netns).expect("open the client's namespace");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the client's namespace");
            work()
        })
    }

    /// [`Smoke::spawn_in_client`], waiting for its result.
    fn in_client<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_client(work).join().expect("client thread")
    }

    /// Idle and in-flight counts, `drain --wait` held by a slow request, the gate.
    fn accounting_drain_and_gate(&self, gate_active: bool, gate: &str) {
        let server: SocketAddr = format!("{NODE}:{PORT}").parse().unwrap();
        let idle = self.in_client(move || -> std::io::Result<TcpStream> {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")?;
            read_answer(&mut stream)?;
            Ok(stream)
        });
        let idle = match idle {
            Ok(stream) => stream,
            Err(err) => return fail("idle", format!("keep-alive request: {err}")),
        };
        let backend = |status: &Value, key: &str| status["backends"][0][key].as_u64();
        match self.wait_status(Duration::from_secs(5), |status| {
            backend(status, "established") == Some(1) && backend(status, "idle") == Some(1)
        }) {
            Some(_) => pass("idle", "an answered keep-alive connection counts idle"),
            None => {
                let status = self.status().unwrap_or_default();
                return fail("idle", format!("status: {}", status["backends"][0]));
            }
        }

        // The slow request: sent now, answered SLOW later, on a thread of its own.
        let (answered_tx, answered_rx) = mpsc::channel();
        let slow_started = Instant::now();
        self.spawn_in_client(move || {
            let result = (|| -> std::io::Result<()> {
                let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
                stream.write_all(b"GET /slow HTTP/1.1\r\nHost: node\r\n\r\n")?;
                read_answer(&mut stream)
            })();
            let _ = answered_tx.send((result.map_err(|err| err.to_string()), Instant::now()));
        });
        if self
            .wait_status(Duration::from_secs(3), |status| {
                backend(status, "in_flight") == Some(1)
            })
            .is_some()
        {
            pass("in_flight", "a slow request counts in flight");
        } else {
            let status = self.status().unwrap_or_default();
            fail("in_flight", format!("status: {}", status["backends"][0]));
        }

        let drain_started = Instant::now();
        let drain = self
            .cli(&["drain", "api", "--wait"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut drain = match drain {
            Ok(drain) => drain,
            Err(err) => return fail("drain", err.to_string()),
        };
        // The gate closes as the drain begins: a new client's connection is refused.
        thread::sleep(Duration::from_millis(500));
        let refused =
            self.in_client(move || TcpStream::connect_timeout(&server, Duration::from_secs(3)));
        match (gate_active, refused) {
            (true, Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => pass(
                "gate",
                "a new connection is refused with a RST while the node drains",
            ),
            (true, other) => fail(
                "gate",
                format!("a new connection while draining: {other:?}"),
            ),
            (false, _) if gate.starts_with("unsupported") => {
                report("gate", "refused", gate.to_string())
            }
            (false, _) => fail("gate", format!("the gate is {gate}")),
        }
        let answered = answered_rx.recv_timeout(SLOW * 3);
        let drain_out = wait_child(&mut drain, Duration::from_secs(30));
        let drain_ended = Instant::now();
        match (answered, drain_out) {
            (Ok((Ok(()), answered_at)), Some((code, out))) => {
                let held = drain_ended.saturating_duration_since(drain_started);
                // The drain ends once the answer is out (and its quiet period has passed):
                // not before the client read it, less a little for the client's own read.
                if code == 0 && drain_ended + Duration::from_millis(200) >= answered_at {
                    pass(
                        "drain",
                        format!(
                            "drain --wait held {:.1} s, until the slow request ({:.1} s) was answered",
                            held.as_secs_f64(),
                            answered_at.duration_since(slow_started).as_secs_f64()
                        ),
                    );
                } else {
                    fail(
                        "drain",
                        format!(
                            "exit {code}, held {:.1} s, answer at {:.1} s: {out}",
                            held.as_secs_f64(),
                            answered_at.duration_since(slow_started).as_secs_f64()
                        ),
                    );
                }
            }
            (answered, drain) => {
                let _ = drain_started;
                fail(
                    "drain",
                    format!("slow request {answered:?}, drain {drain:?}"),
                );
            }
        }
        drop(idle);
        let resumed = self.cli(&["resume", "api"]).output();
        let after = self.in_client(move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")?;
            read_answer(&mut stream)?;
            Ok(String::new())
        });
        match (resumed, after) {
            (Ok(out), Ok(_)) if out.status.success() => {
                pass("resume", "back in service; a new connection is answered")
            }
            (resumed, after) => fail("resume", format!("resume {resumed:?}, request {after:?}")),
        }
    }

    /// The handover where the kernel runs its steering; refused by name where it does not.
    fn handover(&self, active: bool, handover: &str) {
        let out = self.cli(&["handover", "api"]).output();
        let out = match out {
            Ok(out) => out,
            Err(err) => return fail("handover", err.to_string()),
        };
        let said = format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if !active {
            if handover.starts_with("unsupported")
                && !out.status.success()
                && said.contains("handover cannot run on this kernel")
            {
                report("handover", "refused", said);
            } else {
                fail(
                    "handover",
                    format!("the handover is {handover}; it said: {said}"),
                );
            }
            return;
        }
        let server: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
        let answer =
            TcpStream::connect_timeout(&server, Duration::from_secs(5)).and_then(|mut stream| {
                stream.write_all(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")?;
                let mut answer = String::new();
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buffer = [0; 512];
                let read = stream.read(&mut buffer)?;
                answer.push_str(&String::from_utf8_lossy(&buffer[..read]));
                Ok(answer)
            });
        match answer {
            Ok(answer) if out.status.success() && answer.contains("version 2") => {
                pass("handover", "the new version answers on the same port")
            }
            answer => fail(
                "handover",
                format!("exit {:?}: {said}; then {answer:?}", out.status.code()),
            ),
        }
    }
}

/// Reads one answer of the service (its Content-Length body included).
fn read_answer(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SLOW * 3))?;
    let mut seen = Vec::new();
    let mut buffer = [0; 512];
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buffer[..read]);
        if seen.ends_with(b"\n") && seen.windows(4).any(|window| window == b"\r\n\r\n") {
            return Ok(());
        }
    }
}

/// Waits for a child at most `within`; its exit code and its output.
fn wait_child(child: &mut Child, within: Duration) -> Option<(i32, String)> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    let _ = stdout.read_to_string(&mut out);
                }
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = stderr.read_to_string(&mut out);
                }
                return Some((status.code().unwrap_or(-1), out));
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return None;
            }
        }
    }
}
