//! Several hosts (network namespaces) on one Ethernet segment: a bridge in a "switch"
//! namespace, one veth per host. Used for load balancers, API nodes and clients.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Agent, Netns, Process, TempDir, http, require_root, wait_until};

/// Port the test API listens on in every node.
pub const API_PORT: u16 = 8774;
/// Port the load balancers' frontends listen on.
pub const FRONTEND_PORT: u16 = 8080;
/// Port the agents answer HAProxy agent checks on.
pub const AGENT_CHECK_PORT: u16 = 9500;
/// Port the load balancers' runtime API listens on (TCP).
pub const RUNTIME_API_PORT: u16 = 9999;
/// The HAProxy backend (and drain-agent backend) name.
pub const BACKEND: &str = "api";

/// One host on the segment.
pub struct Host {
    pub name: String,
    pub netns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// A directory of its own (configs, logs, sockets).
    pub dir: PathBuf,
}

impl Host {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4), port)
    }
}

/// Hosts joined by a bridge; everything is removed on drop.
pub struct Topology {
    // Drop order: hosts (their processes) first, then the switch, then the directory.
    pub hosts: Vec<Host>,
    _switch: Netns,
    pub dir: TempDir,
}

impl Topology {
    /// Hosts get 198.18.0.(10+i) and 2001:db8:da::(10+i) in the order given. Names are
    /// unique to this process, so tests can build topologies in parallel.
    pub fn new(names: &[&str]) -> Topology {
        require_root();
        let id = crate::unique_id();
        Topology::build(&format!("da-{{}}-{id}"), TempDir::new("topology"), names)
    }

    /// Like `new`, with namespaces named by `pattern` ("{}" stands for the host name) and
    /// files under `dir`; what `cargo xtask lab` uses so that `lab down` can find them.
    pub fn build(pattern: &str, dir: TempDir, names: &[&str]) -> Topology {
        require_root();
        let switch = Netns::create(pattern.replace("{}", "switch"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let netns = Netns::create(pattern.replace("{}", name));
            let port = format!("p{index}");
            switch.add_veth(&port, &netns);
            switch.ip(&["link", "set", &port, "master", "br0", "up"]);
            let v4 = Ipv4Addr::new(198, 18, 0, 10 + index as u8);
            let v6: Ipv6Addr = format!("2001:db8:da::{}", 10 + index).parse().unwrap();
            netns.up_eth0(v4, v6);
            let host_dir = dir.path().join(name);
            std::fs::create_dir_all(&host_dir).unwrap();
            hosts.push(Host {
                name: name.to_string(),
                netns,
                v4,
                v6,
                dir: host_dir,
            });
        }
        Topology {
            hosts,
            _switch: switch,
            dir,
        }
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|host| host.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

/// The test API under gunicorn, managed by tests/app/serve-api.sh like a service manager.
pub fn serve_api_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("app/serve-api.sh")
}

/// A backend's `handover` whose `start` runs the node's next version beside the running one
/// (serve-api.sh start-beside, with the version in the node's `version` file); the old one is
/// stopped by the agent's default, SIGTERM to its gunicorn master. `{node_dir}` is replaced
/// by [`start_node_agent`].
pub fn handover_config() -> String {
    format!(
        "handover = {{ start = [\"{script}\", \"start-beside\", \"{{node_dir}}\", \"{API_PORT}\"], timeout = \"20s\" }}",
        script = serve_api_script().display()
    )
}

/// Starts the API on a node with `version` and waits until it answers (over HTTPS if the
/// node has a certificate, see [`make_tls_certificate`]).
pub fn start_api(node: &Host, version: &str) {
    std::fs::write(node.dir.join("version"), version).unwrap();
    let mut command = node.netns.command(serve_api_script());
    command.args(["start", node.dir.to_str().unwrap(), &API_PORT.to_string()]);
    assert!(
        command.status().unwrap().success(),
        "serve-api.sh start failed"
    );
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
    let tls = node.dir.join("tls-cert").exists();
    wait_until(Duration::from_secs(15), "the API to answer", || {
        if tls {
            // The tests' own HTTP client speaks cleartext only; curl checks the HTTPS API.
            return node
                .netns
                .command("curl")
                .args(["-sfk", "-o", "/dev/null", "-m", "2"])
                .arg(format!("https://127.0.0.1:{API_PORT}/healthz"))
                .status()
                .is_ok_and(|status| status.success());
        }
        node.netns.run(move || {
            http::Connection::connect(addr)
                .and_then(|mut c| c.get("/healthz"))
                .is_ok_and(|r| r.status == 200)
        })
    });
}

/// A self-signed certificate for the name `api` in the node's `tls-cert` and `tls-key`:
/// serve-api.sh then serves HTTPS with it. Not a CA (rustls refuses a CA certificate as a
/// server's own), with the name in subjectAltName (rustls ignores the CN).
pub fn make_tls_certificate(node: &Host) {
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=api", "-days", "2"])
        .args(["-addext", "subjectAltName=DNS:api"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(node.dir.join("tls-key"))
        .arg("-out")
        .arg(node.dir.join("tls-cert"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl req for {}", node.name);
}

/// A backend's `health` over HTTPS, trusting the node's own certificate (for
/// [`start_node_agent`]'s `extra_backend`, which replaces `{node_dir}`).
pub fn https_health_config() -> String {
    format!(
        "health = {{ http = \"https://127.0.0.1:{API_PORT}/healthz\", host = \"api\", ca = \"{{node_dir}}/tls-cert\", expect = 200, timeout = \"10s\" }}"
    )
}

/// HAProxy in front of the nodes: HTTP mode, redispatch, health checks, agent checks naming
/// the backend, and a runtime API on TCP (admin level). `use-server` on an `x-node` header lets
/// a test pin a request to one node.
pub fn haproxy_config(lb: &Host, nodes: &[&Host]) -> String {
    haproxy_config_with(lb, nodes, &HaproxyOptions::default())
}

/// What differs between the tests' HAProxy set-ups.
#[derive(Debug, Clone)]
pub struct HaproxyOptions {
    /// `agent-inter` on every server line.
    pub agent_inter: &'static str,
    /// `retries` in defaults: 0 shows every request a dead server costs.
    pub retries: u32,
    /// Agent checks on the server lines; without them the load balancer follows the runtime
    /// API only.
    pub agent_check: bool,
    /// The servers speak HTTPS (`ssl verify none` on the server lines: traffic and health
    /// checks over TLS).
    pub tls: bool,
    /// HAProxy's L7 retries (`retry-on` in the backend), e.g. "conn-failure empty-response":
    /// what a TLS backend with connection reuse needs across a handover (docs/handover.md).
    pub retry_on: Option<&'static str>,
}

impl Default for HaproxyOptions {
    fn default() -> HaproxyOptions {
        HaproxyOptions {
            agent_inter: "500ms",
            retries: 3,
            agent_check: true,
            tls: false,
            retry_on: None,
        }
    }
}

/// [`haproxy_config`] with other agent-check interval and retries.
pub fn haproxy_config_with(lb: &Host, nodes: &[&Host], options: &HaproxyOptions) -> String {
    let mut config = format!(
        "global
    stats socket ipv4@{v4}:{RUNTIME_API_PORT} level admin
    stats socket {dir}/admin.sock mode 600 level admin
    stats timeout 2m
    maxconn 4000

defaults
    mode http
    option redispatch
    retries {retries}
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
    timeout http-keep-alive 30s

frontend api
    bind :{FRONTEND_PORT}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /healthz
    http-reuse always
",
        v4 = lb.v4,
        dir = lb.dir.display(),
        retries = options.retries,
    );
    if let Some(retry_on) = options.retry_on {
        config.push_str(&format!("    retry-on {retry_on}\n"));
    }
    for node in nodes {
        config.push_str(&format!(
            "    use-server {name} if {{ req.hdr(x-node) -m str {name} }}\n",
            name = node.name
        ));
    }
    for node in nodes {
        config.push_str(&format!(
            "    server {name} {v4}:{API_PORT} check inter 500ms fall 2 rise 2",
            name = node.name,
            v4 = node.v4,
        ));
        if options.tls {
            config.push_str(" ssl verify none");
        }
        if options.agent_check {
            config.push_str(&format!(
                " agent-check agent-port {AGENT_CHECK_PORT} agent-inter {agent_inter} \
                 agent-send \"{BACKEND}\\n\"",
                agent_inter = options.agent_inter,
            ));
        }
        config.push('\n');
    }
    config
}

/// A running HAProxy.
pub struct Haproxy {
    pub process: Process,
    pub socket: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy (foreground, `-db`) on `lb` and waits for its runtime API.
    pub fn start(lb: &Host, config: &str) -> Haproxy {
        let path = lb.dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = File::create(lb.dir.join("haproxy.log")).unwrap();
        let mut command = lb.netns.command("haproxy");
        command
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let haproxy = Haproxy {
            process: Process::spawn("haproxy", &mut command),
            socket: lb.dir.join("admin.sock"),
        };
        wait_until(Duration::from_secs(10), "HAProxy's runtime API", || {
            haproxy
                .try_command("show info")
                .is_some_and(|out| out.contains("Name: HAProxy"))
        });
        haproxy
    }

    /// One runtime API command over the admin Unix socket; `None` if HAProxy is not there.
    pub fn try_command(&self, command: &str) -> Option<String> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    pub fn command(&self, command: &str) -> String {
        self.try_command(command)
            .unwrap_or_else(|| panic!("HAProxy runtime API did not answer `{command}`"))
    }

    /// `show stat` status of a server ("UP", "DRAIN", "MAINT", ...).
    pub fn status(&self, server: &str) -> String {
        self.stat(server, "status")
    }

    /// One `show stat` field of a server.
    pub fn stat(&self, server: &str, field: &str) -> String {
        let out = self.command("show stat -1 4 -1");
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = header
            .iter()
            .position(|name| *name == field)
            .unwrap_or_else(|| panic!("no column {field}"));
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|row| row.first() == Some(&BACKEND) && row.get(1) == Some(&server))
            .and_then(|row| row.get(column).map(|value| value.to_string()))
            .unwrap_or_else(|| panic!("server {server} not in show stat:\n{out}"))
    }
}

/// Writes an agent config for a node behind `lbs` and starts the agent. With no `lbs` the
/// agent knows no runtime API and no HAProxy server: the load balancers learn its state from
/// agent-check alone. `extra_backend` may bring its own `restart` or `health`, which replace
/// the default ones (serve-api.sh restart, HTTP on the API port).
pub fn start_node_agent(node: &Host, lbs: &[&Host], extra_backend: &str, extra_top: &str) -> Agent {
    start_node_agent_with_env(node, lbs, extra_backend, extra_top, &[])
}

/// [`start_node_agent`] with extra environment variables (the agent's test hooks).
pub fn start_node_agent_with_env(
    node: &Host,
    lbs: &[&Host],
    extra_backend: &str,
    extra_top: &str,
    env: &[(&str, &str)],
) -> Agent {
    let socket = node.dir.join("control.sock");
    let mut config = format!(
        "interfaces = [\"eth0\"]\ncontrol_socket = \"{}\"\nagent_check_listen = \"0.0.0.0:{AGENT_CHECK_PORT}\"\n{extra_top}\n",
        socket.display()
    );
    for lb in lbs {
        config.push_str(&format!(
            "[[load_balancer]]\nname = \"{}\"\nruntime_api = \"tcp:{}:{RUNTIME_API_PORT}\"\n\n",
            lb.name, lb.v4
        ));
    }
    config.push_str(&format!(
        "[[backend]]\nname = \"{BACKEND}\"\nports = [{API_PORT}]\n"
    ));
    if !lbs.is_empty() {
        config.push_str(&format!(
            "haproxy = {{ backend = \"{BACKEND}\", server = \"{node}\" }}\n",
            node = node.name
        ));
    }
    if !extra_backend.contains("restart =") {
        config.push_str(&format!(
            "restart = {{ command = [\"{script}\", \"restart\", \"{dir}\", \"{API_PORT}\"], timeout = \"60s\" }}\n",
            script = serve_api_script().display(),
            dir = node.dir.display(),
        ));
    }
    if !extra_backend.contains("health =") {
        config.push_str(&format!(
            "health = {{ http = \"http://127.0.0.1:{API_PORT}/healthz\", expect = 200, timeout = \"10s\" }}\n",
        ));
    }
    let extra_backend = extra_backend.replace("{node_dir}", &node.dir.display().to_string());
    config.push_str(&format!("{extra_backend}\n"));
    crate::start_agent_with_config_and_env(&node.netns, &node.dir, &config, env)
}
