//! The kernel gate (XDP): while a backend drains, new connections from sources outside its
//! allow list are refused at once with a RST; everything else passes; it opens when the agent
//! dies or its deadline passes.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use drain_agent_tests::{
    Agent, CliOutcome, Lab,
    load::{Connections, Load, LoadResult},
    topology::{
        AGENT_CHECK_PORT, BACKEND, FRONTEND_PORT, Haproxy, Topology, haproxy_config, start_api,
        start_node_agent,
    },
    wait_until,
};
use socket2::{Domain, Socket, Type};

const API: u16 = 8080;
/// A port on the node that no backend watches.
const OTHER: u16 = 8090;
/// A second client address, the only source the gate lets through.
const ALLOWED_V4: &str = "198.18.0.3";

/// How a connect from the client namespace ended, and how long it took.
fn connect_from(lab: &Lab, to: SocketAddr, from: Option<IpAddr>) -> (io::Result<()>, Duration) {
    lab.client.run(move || {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        if let Some(from) = from {
            socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
        }
        let started = Instant::now();
        let result = socket.connect_timeout(&to.into(), Duration::from_secs(3));
        (result, started.elapsed())
    })
}

fn assert_refused_at_once(lab: &Lab, to: SocketAddr) {
    let (result, took) = connect_from(lab, to, None);
    let err = result.expect_err("the closed gate let a new connection through");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "expected connection refused to {to}, got {err}"
    );
    assert!(
        took < Duration::from_millis(10),
        "{to} refused after {took:?}: a RST must come at once, not after a retransmission"
    );
}

fn assert_connects(lab: &Lab, to: SocketAddr, from: Option<IpAddr>) {
    let (result, took) = connect_from(lab, to, from);
    result.unwrap_or_else(|err| panic!("connect to {to} from {from:?} failed: {err}"));
    assert!(took < Duration::from_secs(1), "connect took {took:?}");
}

/// A node with the API, a listener on a port no backend has, and an agent whose backend has
/// a gate that lets only ALLOWED_V4 through.
fn lab_with_gate(gate_extra: &str) -> (Lab, drain_agent_tests::Process, Agent) {
    let lab = Lab::new();
    lab.client
        .ip(&["addr", "add", &format!("{ALLOWED_V4}/24"), "dev", "eth0"]);
    let api = lab.start_api(API);
    let listener = lab
        .node
        .run(|| TcpListener::bind(("::", OTHER)).expect("bind the other port"));
    // Accepted connections are never read: the listener's backlog completes handshakes.
    std::mem::forget(listener);
    let agent = lab.start_agent(
        &[],
        &format!(
            "agent_check_interval = \"500ms\"\nmetrics_listen = \"127.0.0.1:9477\"\n\n[[backend]]\nname = \"api\"\nports = [{API}]\n\
             gate = {{ allow = [\"{ALLOWED_V4}/32\"]{gate_extra} }}\n"
        ),
        "ebpf",
    );
    (lab, api, agent)
}

fn drain(agent: &Agent) -> serde_json::Value {
    let outcome = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    outcome.json()
}

#[test]
fn a_closed_gate_refuses_new_connections_at_once_and_lets_everything_else_through() {
    let (lab, _api, agent) = lab_with_gate("");
    let attachments = agent.status()["attachments"].clone();
    let gate = attachments
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["direction"] == "gate")
        .unwrap_or_else(|| panic!("no gate attachment in status: {attachments}"));
    assert!(
        gate["mode"] == "native" || gate["mode"] == "generic",
        "{gate}"
    );
    eprintln!("gate attached in {} mode", gate["mode"]);

    // Open before the drain: a keep-alive connection that must keep working.
    let mut before = lab.connect(Lab::node_addr(false, API));
    assert_eq!(before.get("/").unwrap().status, 200);
    // The first IPv6 contact waits for neighbour discovery (up to a second here): done before
    // the gate closes, so that its timing below is the gate's alone.
    for v6 in [false, true] {
        let (result, _) = connect_from(&lab, Lab::node_addr(v6, API), None);
        result.expect("connect before the drain");
    }

    let report = drain(&agent);
    assert!(report["gate"]["closed_ms"].is_u64(), "{report}");
    assert_eq!(agent.backend("api")["gate"]["state"], "closed");

    assert_refused_at_once(&lab, Lab::node_addr(false, API));
    assert_refused_at_once(&lab, Lab::node_addr(true, API));
    assert_connects(
        &lab,
        Lab::node_addr(false, API),
        Some(ALLOWED_V4.parse().unwrap()),
    );
    assert_eq!(
        before.get("/").unwrap().status,
        200,
        "an established connection must pass a closed gate"
    );
    assert_connects(&lab, Lab::node_addr(false, OTHER), None);
    assert_connects(&lab, Lab::node_addr(true, OTHER), None);

    // The kernel's own diagnostic (aya-log, debug level, at most one a second per CPU)
    // reaches the agent's log.
    wait_until(
        Duration::from_secs(3),
        "the kernel's refusal record in the agent's log",
        || {
            agent
                .log()
                .contains("gate closed: refused a new connection to port 8080")
        },
    );
    let gate = agent.backend("api")["gate"].clone();
    assert_eq!(gate["refused"], 2, "{gate}");
    assert_eq!(gate["allowed"], 1, "{gate}");
    let metrics = scrape(&lab);
    assert!(
        metrics.contains("drain_agent_gate_refused_total{backend=\"api\"} 2"),
        "{metrics}"
    );

    let resumed = agent.cli(&["resume", "api", "--json"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    assert_eq!(agent.backend("api")["gate"]["state"], "open");
    assert_connects(&lab, Lab::node_addr(false, API), None);
    assert_connects(&lab, Lab::node_addr(true, API), None);
}

#[test]
fn sigkill_of_the_agent_with_the_gate_closed_opens_the_node_within_a_second() {
    let (lab, _api, mut agent) = lab_with_gate("");
    drain(&agent);
    assert_refused_at_once(&lab, Lab::node_addr(false, API));
    agent.process.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "a new connection to succeed after the agent's SIGKILL",
        || {
            connect_from(&lab, Lab::node_addr(false, API), None)
                .0
                .is_ok()
        },
    );
    eprintln!("open {:?} after SIGKILL", killed.elapsed());
    agent.process.wait(Duration::from_secs(5));
}

#[test]
fn a_hung_agents_gate_opens_by_itself_at_its_deadline() {
    let (lab, _api, agent) = lab_with_gate(", deadline = \"2s\"");
    let report = drain(&agent);
    assert_eq!(report["gate"]["deadline_s"], 2, "{report}");
    assert_refused_at_once(&lab, Lab::node_addr(false, API));
    agent.process.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    // SIGCONT even when an assertion fails, so the agent can be killed and cleaned up.
    struct Continue(u32);
    impl Drop for Continue {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
    let _continue = Continue(agent.process.pid());
    wait_until(
        Duration::from_secs(4),
        "the gate to open by itself while the agent is stopped",
        || {
            connect_from(&lab, Lab::node_addr(false, API), None)
                .0
                .is_ok()
        },
    );
    eprintln!("open {:?} after SIGSTOP", stopped.elapsed());
    drop(_continue);
    assert_eq!(agent.backend("api")["gate"]["state"], "expired");
}

fn scrape(lab: &Lab) -> String {
    let out = lab
        .node
        .command("curl")
        .args(["-sf", "http://127.0.0.1:9477/metrics"])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// client, lb1 (known to the agents: runtime API and agent-check), lb2 (unknown to them: no
/// agent-check, closes server connections after each request so every request is a new
/// connection, redispatches a refused connect at once), node1 and node2. With `gate`, each
/// node's gate lets only lb1 through.
fn tier_with_an_unknown_load_balancer(gate: bool) -> (Topology, Vec<Haproxy>, Vec<Agent>) {
    let topology = Topology::new(&["client", "lb1", "lb2", "node1", "node2"]);
    let nodes = [topology.host("node1"), topology.host("node2")];
    let (lb1, lb2) = (topology.host("lb1"), topology.host("lb2"));
    for node in nodes {
        start_api(node, "1.0");
    }
    let mut extra = "drain_timeout = \"8s\"\n".to_string();
    if gate {
        extra.push_str(&format!("gate = {{ allow = [\"{}/32\"] }}\n", lb1.v4));
    }
    let agents = nodes
        .iter()
        .map(|node| start_node_agent(node, &[lb1], &extra, ""))
        .collect();
    let unknown = haproxy_config(lb2, &nodes)
        .replace(
            &format!(
                " agent-check agent-port {AGENT_CHECK_PORT} agent-inter 500ms agent-send \"{BACKEND}\\n\""
            ),
            "",
        )
        .replace("http-reuse always", "option http-server-close")
        .replace("option redispatch\n", "option redispatch 1\n");
    assert!(!unknown.contains("agent-check"), "{unknown}");
    let lbs = vec![
        Haproxy::start(lb1, &haproxy_config(lb1, &nodes)),
        Haproxy::start(lb2, &unknown),
    ];
    for lb in &lbs {
        for node in ["node1", "node2"] {
            wait_until(Duration::from_secs(10), &format!("{node} UP"), || {
                lb.status(node) == "UP"
            });
        }
    }
    (topology, lbs, agents)
}

/// A cycle of node1 while clients send slow requests through the unknown load balancer.
fn cycle_behind_an_unknown_load_balancer(gate: bool) -> (CliOutcome, LoadResult) {
    let (topology, _lbs, agents) = tier_with_an_unknown_load_balancer(gate);
    let client = topology.host("client");
    let url = format!(
        "http://{}:{FRONTEND_PORT}/slow?ms=100",
        topology.host("lb2").v4
    );
    let load = Load::start(
        &client.netns,
        &client.dir,
        &url,
        100,
        Duration::from_secs(16),
        Connections::KeepAlive(64),
    );
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(topology.host("node1").dir.join("version"), "2.0").unwrap();
    let outcome = agents[0].cli(&["cycle", "api", "--json"]);
    (outcome, load.finish(Duration::from_secs(60)))
}

#[test]
fn behind_a_load_balancer_the_agent_does_not_know_the_gate_ends_the_drain_on_time_and_loses_nothing()
 {
    let (without, without_load) = cycle_behind_an_unknown_load_balancer(false);
    let shown = |outcome: &CliOutcome| {
        let report = outcome.json();
        format!(
            "exit {:?}, drained after {} ms: {}",
            outcome.code, report["drained_ms"], report["message"]
        )
    };
    let without_gate = format!(
        "without the gate: {}; load: {} requests, {} failed",
        shown(&without),
        without_load.total,
        without_load.errors + without_load.non_2xx
    );
    eprintln!("{without_gate}");
    assert_ne!(
        without.code,
        Some(0),
        "the unknown load balancer was expected to hold the drain without the gate ({without_gate})"
    );

    let (with, load) = cycle_behind_an_unknown_load_balancer(true);
    let report = with.json();
    eprintln!("with the gate: {}", shown(&with));
    assert_eq!(with.code, Some(0), "{with:?}\n({without_gate})");
    let drained_ms = report["drained_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        drained_ms < 3000,
        "with the gate the drain took {drained_ms} ms of its 8 s ({without_gate})"
    );
    assert!(
        report["gate"]["refused"].as_u64().unwrap_or(0) > 0,
        "the unknown load balancer kept sending, so the gate must have refused: {report}"
    );
    load.assert_no_failures(1000);
}

#[test]
fn a_drained_backend_keeps_its_gate_closed_across_an_agent_restart_for_what_is_left_of_its_deadline()
 {
    let (lab, _api, mut agent) = lab_with_gate("");
    drain(&agent);
    let before = agent.backend("api")["gate"]["opens_in_seconds"]
        .as_f64()
        .unwrap();
    agent.kill_and_restart();
    let gate = agent.backend("api")["gate"].clone();
    assert_eq!(gate["state"], "closed", "{gate}");
    let after = gate["opens_in_seconds"].as_f64().unwrap();
    assert!(
        after <= before,
        "the restarted agent extended the deadline: {before}s before, {after}s after"
    );
    assert_refused_at_once(&lab, Lab::node_addr(false, API));
    let resumed = agent.cli(&["resume", "api"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    assert_connects(&lab, Lab::node_addr(false, API), None);
}

/// Sends `frame` out of the client's eth0 and returns the first frame back whose TCP source
/// port is `from_port`, with the VLAN tag the kernel reported beside it (it takes a received
/// tag off the frame before a packet socket sees it): `(tag, frame)`.
fn exchange(lab: &Lab, frame: Vec<u8>, from_port: u16) -> Option<(Option<u16>, Vec<u8>)> {
    lab.client.run(move || {
        use std::os::fd::AsRawFd as _;
        let socket = drain_agent_tests::packet_socket("eth0", libc::ETH_P_ALL as u16);
        let fd = socket.as_raw_fd();
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and option value.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "PACKET_AUXDATA");
        // SAFETY: a valid socket and buffer.
        let sent = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(sent, frame.len() as isize, "{}", io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let mut buffer = [0u8; 2048];
            let mut control = [0u8; 256];
            let mut iov = libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            };
            // SAFETY: msghdr is plain data; zeroed is a valid start.
            let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
            message.msg_iov = &mut iov;
            message.msg_iovlen = 1;
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = control.len();
            // SAFETY: buffers outlive the call; non-blocking, so it never hangs the test.
            let len = unsafe { libc::recvmsg(fd, &mut message, libc::MSG_DONTWAIT) };
            if len < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let received = buffer[..len as usize].to_vec();
            // An untagged IPv4 TCP segment (the tag, if any, is in the auxiliary data).
            if received.len() < 54 || received[12..14] != [0x08, 0x00] || received[23] != 6 {
                continue;
            }
            if u16::from_be_bytes([received[34], received[35]]) != from_port {
                continue;
            }
            let mut tag = None;
            // SAFETY: walking the control messages recvmsg wrote, within msg_controllen.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&message);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_PACKET
                        && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                    {
                        let aux: libc::tpacket_auxdata =
                            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            tag = Some(aux.tp_vlan_tci & 0x0fff);
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&message, cmsg);
                }
            }
            return Some((tag, received));
        }
        None
    })
}

/// The MAC address of `interface` in `netns`.
fn mac_of(netns: &drain_agent_tests::Netns, interface: &str) -> [u8; 6] {
    let path = format!("/sys/class/net/{interface}/address");
    let text = netns.run(move || std::fs::read_to_string(path).unwrap());
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

#[test]
fn a_syn_tagged_for_vlan_100_to_a_closed_gate_is_refused_with_a_reset_on_vlan_100() {
    // This kernel has no 802.1Q devices (CONFIG_VLAN_8021Q), so the client writes the tagged
    // SYN itself with a packet socket, as a host on VLAN 100 of a trunk would send it.
    let (lab, _api, agent) = lab_with_gate("");
    drain(&agent);
    let node_mac = mac_of(&lab.node, "eth0");
    let client_mac = mac_of(&lab.client, "eth0");
    let mut frame = Vec::from(node_mac);
    frame.extend(client_mac);
    frame.extend([0x81, 0x00, 0x00, 100, 0x08, 0x00]);
    let client: std::net::Ipv4Addr = drain_agent_tests::CLIENT_V4.parse().unwrap();
    let node: std::net::Ipv4Addr = drain_agent_tests::NODE_V4.parse().unwrap();
    frame.extend([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    frame.extend(client.octets());
    frame.extend(node.octets());
    frame.extend(40123u16.to_be_bytes());
    frame.extend(API.to_be_bytes());
    frame.extend(7000u32.to_be_bytes());
    frame.extend(0u32.to_be_bytes());
    frame.extend([0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    let (tag, reset) = exchange(&lab, frame, API)
        .expect("no answer to the tagged SYN: the gate let it through or answered elsewhere");
    assert_eq!(tag, Some(100), "the RST must come back on VLAN 100");
    assert_eq!(reset[47], 0x14, "RST|ACK: {reset:?}");
    assert_eq!(
        u32::from_be_bytes([reset[42], reset[43], reset[44], reset[45]]),
        7001,
        "acknowledges the SYN"
    );
    assert_eq!(agent.backend("api")["gate"]["refused"], 1);
}
