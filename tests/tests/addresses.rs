//! Only the service's own connections: a backend is its service's listening addresses. On a
//! node where another program listens on the backend's port at another address — HAProxy's
//! frontend on the VIP, as Kolla-Ansible deploys it beside nova-api — that program's
//! connections are not counted, a closed gate lets them through, and a handover leaves them
//! alone. IPv4 and IPv6.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use drain_agent_tests::{
    Agent, agent_binary,
    http::Connection,
    topology::{API_PORT, Host, Topology, serve_api_script},
    wait_until,
};

/// The second address of the node: the VIP, where the other listener is.
const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xda, 0, 0, 0, 0, 0x100);

/// Starts the test API from `dir` (its `version` and `bind` files) and waits until `check`
/// answers.
fn serve(node: &Host, dir: &Path, version: &str, bind: &[SocketAddr], check: SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("version"), version).unwrap();
    let bind: Vec<String> = bind.iter().map(ToString::to_string).collect();
    std::fs::write(dir.join("bind"), bind.join(" ")).unwrap();
    let status = node
        .netns
        .command(serve_api_script())
        .args(["start", dir.to_str().unwrap(), &API_PORT.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "serve-api.sh start in {}", dir.display());
    wait_until(Duration::from_secs(15), "the API to answer", || {
        node.netns.run(move || {
            Connection::connect(check)
                .and_then(|mut c| c.get("/healthz"))
                .is_ok_and(|r| r.status == 200)
        })
    });
}

/// Stops what `serve` started from `dir` (the test's processes die with their namespace
/// too, but gunicorn daemonizes).
struct Served(std::path::PathBuf, String);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.1])
            .arg(serve_api_script())
            .args(["stop", self.0.to_str().unwrap(), &API_PORT.to_string()])
            .status();
    }
}

/// A client and a node whose service listens on the node's own addresses and whose VIP
/// carries another listener on the same port (answering version "vip"); the agent's backend
/// names the service's addresses (`listen`, when `bound`) or only its port (`ports`), and
/// has a gate and a handover.
struct VipNode {
    // Drop order: the services, the agent, then the namespaces.
    _served: [Served; 2],
    agent: Agent,
    topology: Topology,
    own: [SocketAddr; 2],
    vip: [SocketAddr; 2],
}

impl VipNode {
    fn new(bound: bool) -> VipNode {
        let topology = Topology::new(&["client", "node"]);
        let node = topology.host("node");
        node.netns
            .ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "eth0"]);
        node.netns.ip(&[
            "addr",
            "add",
            &format!("{VIP_V6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let own = [
            SocketAddr::new(IpAddr::V4(node.v4), API_PORT),
            SocketAddr::new(IpAddr::V6(node.v6), API_PORT),
        ];
        let vip = [
            SocketAddr::new(IpAddr::V4(VIP_V4), API_PORT),
            SocketAddr::new(IpAddr::V6(VIP_V6), API_PORT),
        ];
        let vip_dir = node.dir.join("vip");
        serve(node, &vip_dir, "vip", &vip, vip[0]);
        let vip_served = Served(vip_dir, node.netns.name().to_string());
        serve(node, &node.dir, "1.0", &own, own[0]);
        let own_served = Served(node.dir.clone(), node.netns.name().to_string());
        let backend_listen = if bound {
            format!("listen = [\"{}\", \"{}\"]", own[0], own[1])
        } else {
            format!("ports = [{API_PORT}]")
        };
        let config = format!(
            "interfaces = [\"eth0\"]\ncontrol_socket = \"{socket}\"\n\n[[backend]]\nname = \"api\"\n\
             {backend_listen}\ngate = {{ allow = [\"192.0.2.1/32\"] }}\n\
             health = {{ http = \"http://{own4}/healthz\", expect = 200, timeout = \"10s\" }}\n\
             handover = {{ start = [\"{script}\", \"start-beside\", \"{dir}\", \"{API_PORT}\"], timeout = \"20s\" }}\n\
             drain_timeout = \"30s\"\n",
            socket = node.dir.join("control.sock").display(),
            own4 = own[0],
            script = serve_api_script().display(),
            dir = node.dir.display(),
        );
        let agent = drain_agent_tests::start_agent_with_config(&node.netns, &node.dir, &config);
        VipNode {
            topology,
            agent,
            own,
            vip,
            _served: [own_served, vip_served],
        }
    }

    fn client(&self) -> &Host {
        self.topology.host("client")
    }

    /// `/slow?ms=MS` to `to` from the client on a connection of its own; the thread returns
    /// status and version.
    fn slow(&self, to: SocketAddr, ms: u64) -> std::thread::JoinHandle<(u16, String)> {
        let netns = self.client().netns.name().to_string();
        std::thread::spawn(move || {
            drain_agent_tests::enter_netns(&netns);
            let mut connection = Connection::connect(to).unwrap();
            let response = connection.get(&format!("/slow?ms={ms}")).unwrap();
            (response.status, response.version.unwrap_or_default())
        })
    }

    /// The version a new connection to `to` is answered with.
    fn version_at(&self, to: SocketAddr) -> String {
        self.client().netns.run(move || {
            let mut connection = Connection::connect(to).unwrap();
            connection.get("/").unwrap().version.unwrap_or_default()
        })
    }

    fn connect(&self, to: SocketAddr) -> io::Result<()> {
        self.client()
            .netns
            .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .map(drop)
    }

    fn check_config(&self) -> (Option<i32>, String) {
        let out = self
            .topology
            .host("node")
            .netns
            .command_keeping_mounts(agent_binary())
            // The running agent is a warning (`run` would be refused beside it).
            .args(["check-config", "--online", "--allow-warnings"])
            .arg(&self.agent.config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

#[test]
fn another_listener_on_the_backends_port_at_the_vip_is_not_counted_not_gated_and_not_handed_over() {
    let node = VipNode::new(true);
    assert_eq!(
        node.agent.backend("api")["listen"][0],
        node.own[0].to_string()
    );

    // check-config names the other listener and what the agent does with it, and is clean.
    let (code, stdout) = node.check_config();
    assert_eq!(code, Some(0), "{stdout}");
    for vip in node.vip {
        assert!(
            stdout.contains(&format!("listens on {vip} beside backend `api`"))
                && stdout.contains("does not count its connections"),
            "check-config must name the listener on {vip}: {stdout}"
        );
    }

    // Slow requests to the VIP's listener, both families: not the backend's.
    let slow: Vec<_> = node.vip.iter().map(|&vip| node.slow(vip, 6000)).collect();
    let mut idle = node.client().netns.run({
        let own = node.own[0];
        move || Connection::connect(own).unwrap()
    });
    assert_eq!(idle.get("/").unwrap().version.as_deref(), Some("1.0"));
    std::thread::sleep(Duration::from_millis(500));
    let backend = node.agent.backend("api");
    assert_eq!(
        backend["established"], 1,
        "only the service's connection: {backend}"
    );
    assert_eq!(backend["in_flight"], 0, "{backend}");

    // The drain does not wait for the VIP's slow requests.
    let started = Instant::now();
    let drained = node.agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    assert!(
        slow.iter().all(|request| !request.is_finished()),
        "the drain ended only after the VIP's slow requests ({:?})",
        started.elapsed()
    );

    // The closed gate refuses the backend's addresses and lets the VIP's through.
    for (own, vip) in node.own.iter().zip(&node.vip) {
        let err = node
            .connect(*own)
            .expect_err("the closed gate let a connection through");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{own}: {err}");
        node.connect(*vip)
            .unwrap_or_else(|err| panic!("the gate refused the VIP's listener at {vip}: {err}"));
        assert_eq!(node.version_at(*vip), "vip");
    }
    let resumed = node.agent.cli(&["resume", "api"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    for request in slow {
        assert_eq!(request.join().unwrap(), (200, "vip".to_string()));
    }

    // A handover steers the backend's addresses to the new version and leaves the VIP alone.
    let node_dir = node.topology.host("node").dir.clone();
    std::fs::write(node_dir.join("version"), "2.0").unwrap();
    let vip_master = std::fs::read_to_string(node_dir.join("vip/gunicorn.pid")).unwrap();
    let handover = node.agent.cli_in_background(&["handover", "api", "--json"]);
    let mut during = 0;
    while !handover.is_finished() {
        for vip in node.vip {
            assert_eq!(
                node.version_at(vip),
                "vip",
                "the VIP's listener must answer {vip}"
            );
            during += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let handover = handover.join().unwrap();
    assert_eq!(handover.code, Some(0), "{handover:?}\n{}", node.agent.log());
    assert!(during > 0);
    for (own, vip) in node.own.iter().zip(&node.vip) {
        assert_eq!(node.version_at(*own), "2.0");
        assert_eq!(node.version_at(*vip), "vip");
    }
    let pid: i32 = vip_master.trim().parse().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the handover stopped the VIP's listener (pid {pid}) as if it were the old version"
    );
}

#[test]
fn a_backend_on_every_address_of_its_port_counts_the_vips_listener_and_check_config_says_so() {
    // The negative control: `ports` keeps today's meaning (every address), so the VIP's
    // listener is counted — what the test above shows cannot happen with `listen`.
    let node = VipNode::new(false);
    let (code, stdout) = node.check_config();
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.contains("backend[0].ports")
            && stdout.contains("several processes listen there")
            && stdout.contains("listen = ["),
        "{stdout}"
    );
    let slow = node.slow(node.vip[0], 3000);
    wait_until(
        Duration::from_secs(2),
        "the VIP's slow request counted as the backend's",
        || node.agent.backend("api")["in_flight"] == 1,
    );
    assert_eq!(slow.join().unwrap(), (200, "vip".to_string()));
}
