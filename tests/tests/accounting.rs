//! Kernel connection accounting against ground truth: real kernel programs on a veth, gunicorn
//! serving a keep-alive API, real TCP clients, and `ss` in the node namespace.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use drain_agent_tests::{
    Agent, Lab, NODE_V4, NODE_V6, command_output, http::Connection, wait_until,
};

const API: u16 = 8080;
const BACKEND: &str = "api";
/// Quiet period configured in these tests, and the margin allowed on top of it.
const QUIET: Duration = Duration::from_millis(50);
const MARGIN: Duration = Duration::from_millis(450);

fn lab_with_agent() -> (Lab, drain_agent_tests::Process, Agent) {
    let lab = Lab::new();
    let api = lab.start_api(API);
    let agent = lab.start_agent(&[(BACKEND, &[API])], "quiet_period = \"50ms\"", "ebpf");
    (lab, api, agent)
}

/// Opens `count` keep-alive connections, each after one completed request.
fn idle_connections(lab: &Lab, addr: SocketAddr, count: usize) -> Vec<Connection> {
    (0..count)
        .map(|_| {
            let mut connection = lab.connect(addr);
            let response = connection.get("/").expect("GET /");
            assert_eq!(response.status, 200);
            connection
        })
        .collect()
}

/// Runs `drain --wait` while `slow`'s response is outstanding, reads the response, and checks
/// that the drain returned only after it; returns the drain's report.
fn drain_outlasts(agent: &Agent, slow: &mut Connection) -> serde_json::Value {
    let drain = agent.cli_in_background(&["drain", BACKEND, "--wait", "--json"]);
    assert_eq!(slow.read_response().unwrap().status, 200);
    let answered = Instant::now();
    let outcome = drain.join().unwrap();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        outcome.finished >= answered,
        "the drain returned {:?} before the request in flight was answered",
        answered - outcome.finished
    );
    outcome.json()
}

fn wait_for(agent: &Agent, field: &str, value: u64, timeout: Duration) {
    wait_until(timeout, &format!("{field} == {value}"), || {
        agent.count(BACKEND, field) == value
    });
}

fn idle_and_slow_requests(v6: bool) {
    let (lab, _api, agent) = lab_with_agent();
    let addr = Lab::node_addr(v6, API);
    let mut connections = idle_connections(&lab, addr, 10);

    // 10 idle keep-alive connections.
    wait_for(&agent, "established", 10, Duration::from_secs(2));
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["in_flight"], 0, "{backend}");
    assert_eq!(backend["idle"], 10, "{backend}");
    assert_eq!(backend["accepted"], 10, "{backend}");
    assert_eq!(lab.ss_established(API), 10, "ss disagrees");

    // Three slow requests on three of them: in flight while they run.
    for connection in &mut connections[..3] {
        connection.send("/slow?ms=3000").unwrap();
    }
    wait_for(&agent, "in_flight", 3, Duration::from_secs(1));
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2000) {
        let backend = agent.backend(BACKEND);
        assert_eq!(
            backend["in_flight"], 3,
            "a slow request stopped counting: {backend}"
        );
        assert_eq!(backend["idle"], 7, "{backend}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for connection in &mut connections[..3] {
        let response = connection.read_response().unwrap();
        assert_eq!(response.status, 200);
    }
    // Reading the response means the client kernel has it; its ACK is on the way.
    let answered = Instant::now();
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    eprintln!(
        "in-flight reached 0 {:?} after the responses were read",
        answered.elapsed()
    );
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["idle"], 10, "{backend}");
    assert_eq!(backend["established"], 10, "{backend}");
    assert_eq!(lab.ss_established(API), 10, "ss disagrees");
    drop(connections);
    wait_for(&agent, "established", 0, Duration::from_secs(2));
    assert_eq!(agent.count(BACKEND, "closed"), 10);
}

#[test]
fn idle_keepalive_and_slow_requests_over_ipv4() {
    idle_and_slow_requests(false);
}

#[test]
fn idle_keepalive_and_slow_requests_over_ipv6() {
    idle_and_slow_requests(true);
}

fn large_download(v6: bool) {
    const SIZE: u64 = 50_000_000;
    const HELD_BACK: u64 = 4_000_000;
    let (lab, _api, agent) = lab_with_agent();
    let mut connection = lab.connect(Lab::node_addr(v6, API));
    // A small receive buffer keeps most of the response on the server until we read it.
    socket2::SockRef::from(connection.stream())
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    connection.send(&format!("/bytes?n={SIZE}")).unwrap();
    let head = connection.read_head().unwrap();
    assert_eq!(head.content_length, SIZE);
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));

    // Read all but the last few MB, then stop: the rest is unsent or unacknowledged.
    let mut read = 0;
    while read < SIZE - HELD_BACK {
        read += connection.read_body(1_000_000).unwrap();
        // While the client reads, the server's send buffer can empty with every byte
        // acknowledged before the application writes its next chunk: in flight is 0 for that
        // moment, as docs/accounting.md says (the quiet period covers it), and a loaded machine
        // makes the moment long enough to be seen. The next chunk puts it back.
        wait_for(&agent, "in_flight", 1, Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.count(BACKEND, "in_flight"),
        1,
        "a response with unacknowledged bytes must stay in flight"
    );
    read += connection.read_body(SIZE - read).unwrap();
    assert_eq!(read, SIZE);
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    assert_eq!(agent.count(BACKEND, "idle"), 1);
}

#[test]
fn large_download_is_in_flight_until_the_last_byte_is_acknowledged_ipv4() {
    large_download(false);
}

#[test]
fn large_download_is_in_flight_until_the_last_byte_is_acknowledged_ipv6() {
    large_download(true);
}

fn burst(v6: bool) {
    const CONNECTIONS: usize = 10_000;
    const THREADS: usize = 20;
    let (lab, _api, agent) = lab_with_agent();
    let addr = Lab::node_addr(v6, API);
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let start = start.clone();
            let client = lab.client.name().to_string();
            std::thread::spawn(move || {
                drain_agent_tests::enter_netns(&client);
                start.wait();
                let mut failures = 0;
                for _ in 0..CONNECTIONS / THREADS {
                    let ok = Connection::connect(addr)
                        .and_then(|mut connection| {
                            connection.send_closing("/")?;
                            connection.read_response()
                        })
                        .is_ok_and(|response| response.status == 200);
                    failures += usize::from(!ok);
                }
                failures
            })
        })
        .collect();
    let failures: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(failures, 0, "client requests failed");

    let backend = agent.wait_backend(
        BACKEND,
        Duration::from_secs(10),
        "all connections to close",
        |b| b["established"] == 0 && b["in_flight"] == 0,
    );
    assert_eq!(backend["accepted"], CONNECTIONS as u64, "{backend}");
    let ended = backend["closed"].as_u64().unwrap() + backend["reset"].as_u64().unwrap();
    assert_eq!(ended, CONNECTIONS as u64, "closed + reset: {backend}");
    assert_eq!(backend["flow_table_full"], 0, "{backend}");
    assert_eq!(agent.status()["flow_table"]["entries"], 0);
}

#[test]
fn burst_of_ten_thousand_short_connections_ipv4() {
    burst(false);
}

#[test]
fn burst_of_ten_thousand_short_connections_ipv6() {
    burst(true);
}

fn resets(v6: bool) {
    const RESETTING: u16 = 8081;
    let lab = Lab::new();
    let _api = lab.start_api(API);
    // A second backend whose server aborts every connection (SO_LINGER 0): the node sends RST.
    let listener = lab
        .node
        .run(move || TcpListener::bind(SocketAddr::new("::".parse().unwrap(), RESETTING)).unwrap());
    let aborter = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        let _ = std::io::Read::read(&mut &stream, &mut byte);
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let agent = lab.start_agent(&[(BACKEND, &[API]), ("aborting", &[RESETTING])], "", "ebpf");

    // The client resets an idle keep-alive connection.
    let connection = idle_connections(&lab, Lab::node_addr(v6, API), 1)
        .pop()
        .unwrap();
    wait_for(&agent, "established", 1, Duration::from_secs(2));
    connection.reset();
    wait_for(&agent, "established", 0, Duration::from_secs(2));
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["reset_by_client"], 1, "{backend}");
    assert_eq!(backend["reset_by_server"], 0, "{backend}");
    assert_eq!(backend["reset"], 1, "{backend}");
    assert_eq!(backend["closed"], 0, "{backend}");

    // The server resets a connection that sent it a request.
    let mut connection = lab.connect(Lab::node_addr(v6, RESETTING));
    connection.send("/").unwrap();
    aborter.join().unwrap();
    assert!(
        connection.read_response().is_err(),
        "the server should have reset"
    );
    wait_until(Duration::from_secs(2), "the server reset to count", || {
        agent.count("aborting", "reset_by_server") == 1
    });
    let aborting = agent.backend("aborting");
    assert_eq!(aborting["established"], 0, "{aborting}");
    assert_eq!(aborting["in_flight"], 0, "{aborting}");
    assert_eq!(aborting["reset_by_client"], 0, "{aborting}");
}

#[test]
fn resets_are_counted_by_direction_ipv4() {
    resets(false);
}

#[test]
fn resets_are_counted_by_direction_ipv6() {
    resets(true);
}

#[test]
fn half_closed_request_stays_in_flight_until_answered() {
    let (lab, _api, agent) = lab_with_agent();
    let mut connection = lab.connect(Lab::node_addr(false, API));
    connection.send("/slow?ms=1500").unwrap();
    connection.shutdown_write().unwrap(); // client FIN after the request
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.count(BACKEND, "in_flight"), 1, "half-closed request");
    assert_eq!(connection.read_response().unwrap().status, 200);
    wait_for(&agent, "established", 0, Duration::from_secs(3));
    assert_eq!(agent.count(BACKEND, "in_flight"), 0);
    assert_eq!(agent.count(BACKEND, "closed"), 1);
}

/// The kernel programs read the TCP header where the IPv4 header's length says it starts:
/// a client whose segments carry IP options (a 24-byte IPv4 header) is tracked like any other.
#[test]
fn segments_with_ipv4_options_are_tracked_past_the_longer_header() {
    let (lab, _api, agent) = lab_with_agent();
    let capture = lab.node.run(|| PacketCapture::open("eth0"));
    let mut connection = lab.connect(Lab::node_addr(false, API));
    // Three NOPs and an end-of-options: the smallest options there are (4 bytes, IHL 6).
    set_ip_options(connection.stream(), &[1, 1, 1, 0]);
    connection.send("/slow?ms=1500").unwrap();
    assert!(
        capture.saw_ipv4_options_to(API, Duration::from_secs(2)),
        "no segment with IP options reached the node: the test would prove nothing"
    );
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));
    assert_eq!(connection.read_response().unwrap().status, 200);
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["idle"], 1, "{backend}");
    assert_eq!(backend["established"], 1, "{backend}");
}

fn set_ip_options(stream: &std::net::TcpStream, options: &[u8]) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid socket, and a buffer of the given length.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
}

/// A packet socket on one interface: the frames as the TC programs see them.
struct PacketCapture(std::os::fd::OwnedFd);

impl PacketCapture {
    fn open(interface: &str) -> PacketCapture {
        PacketCapture(drain_agent_tests::packet_socket(
            interface,
            libc::ETH_P_IP as u16,
        ))
    }

    /// Whether an IPv4 TCP segment to `port` with a header longer than 20 bytes arrives
    /// within `timeout`.
    fn saw_ipv4_options_to(&self, port: u16, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd as _;
        let deadline = Instant::now() + timeout;
        let mut frame = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: a valid socket and buffer; non-blocking, so it never hangs the test.
            let len = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if len < 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            // A packet socket of SOCK_RAW type gives the whole frame, Ethernet header first.
            let ip = &frame[14..len as usize];
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            if ip[9] == 6 && header_len > 20 && ip.len() >= header_len + 4 {
                let dest = u16::from_be_bytes([ip[header_len + 2], ip[header_len + 3]]);
                if dest == port {
                    return true;
                }
            }
        }
        false
    }
}

#[test]
fn killing_the_agent_detaches_the_programs_and_the_node_keeps_serving() {
    let (lab, _api, mut agent) = lab_with_agent();
    let status = agent.status();
    let programs: Vec<u64> = status["attachments"]
        .as_array()
        .expect("attachments in status")
        .iter()
        .map(|attachment| attachment["program_id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        programs.len(),
        3,
        "ingress and egress, then sock_ops, on the cgroup root: {status}"
    );
    // The packet programs first, the sock_ops program last (docs/accounting.md).
    assert_eq!(
        status["attachments"][2]["direction"], "sock_ops",
        "{status}"
    );
    // A program exists in the kernel as long as a link (or an fd) holds it.
    let loaded = |id: u64| {
        command_output("bpftool", &["prog", "show", "id", &id.to_string()])
            .status
            .success()
    };
    assert!(
        programs.iter().all(|&id| loaded(id)),
        "programs {programs:?} not loaded"
    );
    let mut connection = idle_connections(&lab, Lab::node_addr(false, API), 1)
        .pop()
        .unwrap();

    agent.process.signal(nix::sys::signal::Signal::SIGKILL);
    agent.process.wait(Duration::from_secs(5));
    wait_until(
        Duration::from_secs(5),
        "the programs and their links to go away",
        || programs.iter().all(|&id| !loaded(id)),
    );
    // Existing and new connections are served.
    assert_eq!(connection.get("/").unwrap().status, 200);
    let mut fresh = lab.connect(Lab::node_addr(false, API));
    assert_eq!(fresh.get("/").unwrap().status, 200);
}

#[test]
fn procfs_mode_counts_established_like_ss() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let agent = lab.start_agent(&[(BACKEND, &[API])], "", "procfs");
    let _connections = idle_connections(&lab, Lab::node_addr(false, API), 7);
    let _v6 = idle_connections(&lab, Lab::node_addr(true, API), 2);
    let status = agent.status();
    assert_eq!(status["kernel"], "procfs");
    let backend = &status["backends"][0];
    assert_eq!(backend["established"], 9, "{backend}");
    assert_eq!(backend["established"], lab.ss_established(API) as u64);
    assert!(backend["in_flight"].is_null(), "{backend}");
    assert!(backend["idle"].is_null(), "{backend}");
}

#[test]
fn connections_older_than_the_agent_are_counted_and_tracked() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let addr = Lab::node_addr(false, API);
    let mut connections = idle_connections(&lab, addr, 5);
    let mut slow = lab.connect(addr);
    slow.send("/slow?ms=2000").unwrap();

    let agent = lab.start_agent(&[(BACKEND, &[API])], "quiet_period = \"50ms\"", "ebpf");
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["established"], 6, "{backend}");
    assert_eq!(lab.ss_established(API), 6);
    assert_eq!(
        backend["accepted"], 0,
        "seeded connections were not accepted while we watched"
    );
    // The agent did not see them begin: unknown, not idle, until their traffic says.
    assert_eq!(backend["unknown"], 6, "{backend}");
    assert_eq!(backend["in_flight"], 0, "{backend}");
    assert_eq!(backend["idle"], 0, "{backend}");

    // A new request on an old connection is seen from its first byte.
    connections[0].send("/slow?ms=1000").unwrap();
    wait_for(&agent, "in_flight", 1, Duration::from_millis(500));
    assert_eq!(agent.count(BACKEND, "unknown"), 5);
    // The request that was already running shows up once its response starts; both end
    // idle, the four untouched connections stay unknown.
    assert_eq!(slow.read_response().unwrap().status, 200);
    assert_eq!(connections[0].read_response().unwrap().status, 200);
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    wait_for(&agent, "unknown", 4, QUIET + MARGIN);
    assert_eq!(agent.count(BACKEND, "idle"), 2);
    drop(connections);
    drop(slow);
    wait_for(&agent, "established", 0, Duration::from_secs(2));
    assert_eq!(agent.count(BACKEND, "closed"), 6);
}

#[test]
fn a_connection_whose_socket_dies_without_fin_or_rst_on_the_wire_leaves_the_counters() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let agent = lab.start_agent(&[(BACKEND, &[API])], "", "ebpf");
    let mut connection = lab.connect(Lab::node_addr(false, API));
    connection.send("/slow?ms=3000").unwrap();
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));

    // Destroy the node's socket while the link is down, so no RST reaches the wire: nothing
    // the TC programs see says it ended, but the kernel's state change does.
    lab.node.ip(&["link", "set", "eth0", "down"]);
    let mut kill = lab.node.command("ss");
    kill.args(["-K", "-tn", "state", "established", "( sport = :8080 )"]);
    assert!(kill.status().unwrap().success(), "ss -K failed");
    let backend = agent.wait_backend(BACKEND, Duration::from_secs(1), "the state callback", |b| {
        b["established"] == 0
    });
    lab.node.ip(&["link", "set", "eth0", "up"]);
    assert_eq!(lab.ss_established(API), 0);
    assert_eq!(backend["vanished"], 1, "{backend}");
    assert_eq!(backend["in_flight"], 0, "{backend}");
    assert_eq!(
        backend["cut_in_flight"], 1,
        "lost while in flight: {backend}"
    );
    assert_eq!(backend["reset"], 0, "{backend}");
    assert_eq!(backend["closed"], 0, "{backend}");
    assert_eq!(agent.status()["flow_table"]["entries"], 0);
}

#[test]
fn an_older_connection_whose_socket_vanishes_is_garbage_collected() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let _connection = idle_connections(&lab, Lab::node_addr(false, API), 1);
    // Seeded from the socket table: no state callback for it, only the wire and the GC.
    let agent = lab.start_agent(&[(BACKEND, &[API])], "flow_idle_check = \"1s\"", "ebpf");
    assert_eq!(agent.count(BACKEND, "established"), 1);
    assert_eq!(agent.status()["flow_table"]["entries"], 1);

    lab.node.ip(&["link", "set", "eth0", "down"]);
    let mut kill = lab.node.command("ss");
    kill.args(["-K", "-tn", "state", "established", "( sport = :8080 )"]);
    assert!(kill.status().unwrap().success(), "ss -K failed");
    lab.node.ip(&["link", "set", "eth0", "up"]);
    assert_eq!(lab.ss_established(API), 0);
    assert_eq!(
        agent.count(BACKEND, "established"),
        1,
        "nothing on the wire said it closed, and the kernel does not call back for it"
    );

    let backend = agent.wait_backend(BACKEND, Duration::from_secs(5), "garbage collection", |b| {
        b["established"] == 0
    });
    assert_eq!(backend["vanished"], 1, "{backend}");
    assert_eq!(backend["in_flight"], 0, "{backend}");
    assert_eq!(agent.status()["flow_table"]["entries"], 0);
}

/// Raw TCP from the client namespace (Python: the standard library has raw sockets).
const RAW_TCP: &str = r#"
import socket, struct, sys

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def tcp(src, sport, dst, dport, seq, ack, flags):
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                         5 << 4, flags, 65535, 0, 0)
    if ":" in dst:
        return header  # IPv6: the raw socket computes the checksum (IPV6_CHECKSUM)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
"#;

/// Opens a connection, sends a slow request, learns its own next sequence number from its
/// own data segment (AF_PACKET), then follows commands on stdin.
const SPOOFER: &str = r#"
node, port = sys.argv[1], int(sys.argv[2])
v6 = ":" in node
# ETH_P_ALL: only "all protocols" taps see outgoing frames.
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sniff.bind(("eth0", 3))
sniff.settimeout(10)
conn = socket.create_connection((node, port))
src, sport = conn.getsockname()[:2]
conn.sendall(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: node\r\n\r\n")
while True:
    frame = sniff.recv(65535)
    ip = frame[14:]
    if v6:
        if frame[12:14] != b"\x86\xdd" or ip[6] != 6:
            continue
        segment = ip[40:]
        ip_payload = struct.unpack("!H", ip[4:6])[0]
    else:
        ihl = (ip[0] & 15) * 4
        if frame[12:14] != b"\x08\x00" or ip[9] != 6:
            continue
        segment = ip[ihl:]
        ip_payload = struct.unpack("!H", ip[2:4])[0] - ihl
    s, d, seq, ack = struct.unpack("!HHII", segment[:12])
    payload = ip_payload - (segment[12] >> 4) * 4
    if s == sport and d == port and payload > 0:
        next_seq, acked = (seq + payload) & 0xFFFFFFFF, ack
        break
if v6:
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 16)
else:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
def send(seq, ack, flags):
    raw.sendto(tcp(src, sport, node, port, seq, ack, flags), (node, 0))
print("ready", next_seq, flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "spoof":
        far = 0x40000000
        send(next_seq + far, 0, RST)
        send(next_seq - far, acked, RST | ACK)
        send(next_seq + far, acked, FIN | ACK)
        send(next_seq - far, acked, FIN | ACK)
        # Inside the window but not exact: the kernel answers with a challenge ACK (RFC 5961).
        send(next_seq + 1000, 0, RST)
        print("spoofed", flush=True)
    elif command == "read":
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
        while len(body) < length:
            body += conn.recv(65536)
        print("status", head.split(b" ")[1].decode(), flush=True)
    elif command == "reset":
        send(next_seq, 0, RST)
        print("reset", flush=True)
    elif command == "far-reset":
        send(next_seq + 0x40000000, 0, RST)
        print("far-reset", flush=True)
    elif command == "exit":
        break
"#;

/// Sends `count` SYNs to the node from `src` (an address nobody owns), source ports from 10000.
const SYN_FLOOD: &str = r#"
import random
node, port, src, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if ":" in node:
    # IPv6: the kernel builds the header from a socket bound to the spoofed source (assigned
    # on the client, whose SYN-ACKs the node sends to a MAC nobody has) and fills in the TCP
    # checksum (IPV6_CHECKSUM).
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 16)
    raw.bind((src, 0))
    for i in range(count):
        raw.sendto(tcp(src, 10000 + i, node, port, random.getrandbits(32), 0, SYN), (node, 0))
else:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    for i in range(count):
        segment = tcp(src, 10000 + i, node, port, random.getrandbits(32), 0, SYN)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0, 64, 6, 0,
                         socket.inet_aton(src), socket.inet_aton(node))
        raw.sendto(ip + segment, (node, 0))
print("sent", count, flush=True)
"#;

/// A python helper in the client namespace, talked to line by line.
struct Helper {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Helper {
    fn start(lab: &Lab, script: &str, args: &[&str]) -> Helper {
        let mut command = lab.client.command("python3");
        command
            .arg("-c")
            .arg(format!("{RAW_TCP}\n{script}"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = command.spawn().expect("start python3");
        let stdout = child.stdout.take().unwrap();
        Helper {
            child,
            lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)),
        }
    }

    fn line(&mut self) -> String {
        self.lines
            .next()
            .expect("the helper ended early")
            .expect("read the helper's output")
    }

    fn ask(&mut self, command: &str) -> String {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn spoofed_rst_and_fin_outside_the_window_do_not_end_a_running_request_ipv4() {
    spoofed_rst_and_fin(false);
}

#[test]
fn spoofed_rst_and_fin_outside_the_window_do_not_end_a_running_request_ipv6() {
    spoofed_rst_and_fin(true);
}

fn spoofed_rst_and_fin(v6: bool) {
    let (lab, _api, agent) = lab_with_agent();
    let node = if v6 { NODE_V6 } else { NODE_V4 };
    let mut spoofer = Helper::start(&lab, SPOOFER, &[node, &API.to_string()]);
    let ready = spoofer.line();
    assert!(ready.starts_with("ready "), "{ready}");
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));

    assert_eq!(spoofer.ask("spoof"), "spoofed");
    // Give the segments time to reach the node and anything they would do time to show.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        let backend = agent.backend(BACKEND);
        assert_eq!(
            backend["in_flight"], 1,
            "a spoofed segment ended it: {backend}"
        );
        assert_eq!(backend["established"], 1, "{backend}");
        assert_eq!(backend["reset"], 0, "{backend}");
        assert_eq!(backend["closed"], 0, "{backend}");
        assert_eq!(backend["vanished"], 0, "{backend}");
        assert_eq!(backend["cut_in_flight"], 0, "{backend}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.ss_established(API), 1, "the kernel ignored them too");
    assert!(
        node_tcp_ext(&lab, "TCPChallengeACK") >= 1,
        "the in-window RST reached the node and was challenged"
    );

    // The request runs on and completes.
    assert_eq!(spoofer.ask("read"), "status 200");
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    assert_eq!(agent.count(BACKEND, "established"), 1);

    // A RST at exactly the next sequence number is one the kernel accepts: it ends the flow.
    assert_eq!(spoofer.ask("reset"), "reset");
    let backend = agent.wait_backend(BACKEND, Duration::from_secs(2), "the reset", |b| {
        b["established"] == 0
    });
    assert_eq!(backend["reset_by_client"], 1, "{backend}");
    assert_eq!(backend["reset_by_server"], 0, "{backend}");
    assert_eq!(backend["cut_in_flight"], 0, "{backend}");
    assert_eq!(backend["vanished"], 0, "{backend}");
    assert_eq!(agent.status()["flow_table"]["entries"], 0);
}

#[test]
fn a_spoofed_rst_as_the_first_segment_does_not_end_a_connection_older_than_the_agent() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let mut spoofer = Helper::start(&lab, SPOOFER, &[NODE_V4, &API.to_string()]);
    let ready = spoofer.line();
    assert!(ready.starts_with("ready "), "{ready}");
    // Started after the connection and its request: the agent seeds it, sequence unknown.
    let agent = lab.start_agent(&[(BACKEND, &[API])], "quiet_period = \"50ms\"", "ebpf");
    assert_eq!(agent.count(BACKEND, "unknown"), 1);
    // Its first client segment since: a RST far outside the window, which the kernel drops.
    assert_eq!(spoofer.ask("far-reset"), "far-reset");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        let backend = agent.backend(BACKEND);
        assert_eq!(
            backend["established"], 1,
            "a spoofed RST ended it: {backend}"
        );
        assert_eq!(backend["reset_by_client"], 0, "{backend}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(spoofer.ask("read"), "status 200");
}

/// /proc/net/netstat's TcpExt counter `name` in the node namespace.
fn node_tcp_ext(lab: &Lab, name: &str) -> u64 {
    let out = lab
        .node
        .command("cat")
        .arg("/proc/net/netstat")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("TcpExt:"))
        .collect();
    let names = lines[0].split_whitespace();
    let values = lines[1].split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("TcpExt {name} missing"))
}

fn syn_flood(v6: bool) {
    const TABLE: u64 = 1024;
    const SYNS: u64 = 2_500;
    let (nobody, node) = if v6 {
        ("2001:db8:da::77", NODE_V6)
    } else {
        ("198.18.0.77", NODE_V4)
    };
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let agent = lab.start_agent(
        &[(BACKEND, &[API])],
        &format!(
            "flow_table_size = {TABLE}\nagent_check_listen = \"127.0.0.1:9500\"\n\
             agent_check_interval = \"200ms\""
        ),
        "ebpf",
    );
    // The node answers the spoofed address's SYNs toward a MAC nobody has: the SYN-ACKs go
    // nowhere and every handshake stays half open.
    lab.node.ip(&[
        "neigh",
        "replace",
        nobody,
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    if v6 {
        // The raw socket needs the source assigned; the node's SYN-ACKs still go nowhere.
        // Its answers to neighbour solicitations from that source would too, so the client
        // learns the node's MAC up front.
        lab.client.ip(&[
            "addr",
            "add",
            &format!("{nobody}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let link = lab.node.ip(&["-j", "link", "show", "eth0"]);
        let link: serde_json::Value = serde_json::from_str(&link).unwrap();
        let mac = link[0]["address"].as_str().unwrap().to_string();
        lab.client.ip(&[
            "neigh",
            "replace",
            node,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
    let mut flood = Helper::start(
        &lab,
        SYN_FLOOD,
        &[node, &API.to_string(), nobody, &SYNS.to_string()],
    );
    assert_eq!(flood.line(), format!("sent {SYNS}"));
    if v6 {
        // Real clients must not pick the spoofed address as their source.
        lab.client
            .ip(&["addr", "del", &format!("{nobody}/64"), "dev", "eth0"]);
    }
    // Every SYN was answered: from the SYN queue (SYN-RECV sockets) or with a SYN cookie.
    let mut half_open = 0;
    wait_until(
        Duration::from_secs(5),
        "the node to answer the flood",
        || {
            let mut ss = lab.node.command("ss");
            ss.args(["-Htn", "state", "syn-recv", "( sport = :8080 )"]);
            let syn_recv = String::from_utf8_lossy(&ss.output().unwrap().stdout)
                .lines()
                .count() as u64;
            half_open = syn_recv + node_tcp_ext(&lab, "SyncookiesSent");
            half_open >= 2 * TABLE
        },
    );
    eprintln!("half-open handshakes answered: {half_open}");

    let backend = agent.backend(BACKEND);
    assert_eq!(backend["established"], 0, "{backend}");
    assert_eq!(backend["flow_table_full"], 0, "{backend}");
    assert_eq!(agent.status()["flow_table"]["entries"], 0);

    let mut connection = lab.connect(Lab::node_addr(v6, API));
    connection.send("/slow?ms=1500").unwrap();
    wait_for(&agent, "in_flight", 1, Duration::from_secs(1));
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["established"], 1, "{backend}");
    assert_eq!(backend["accepted"], 1, "{backend}");
    assert_eq!(backend["flow_table_full"], 0, "{backend}");
    assert_eq!(backend["flow_table_entries"], 1, "{backend}");
    // The drain waits for the real request, flood or not.
    drain_outlasts(&agent, &mut connection);
}

#[test]
fn a_half_open_syn_flood_creates_no_state_and_a_real_request_is_still_counted() {
    syn_flood(false);
}

#[test]
fn a_half_open_ipv6_syn_flood_creates_no_state_and_a_real_request_is_still_counted() {
    syn_flood(true);
}

#[test]
fn churn_on_reused_source_ports_never_counts_a_connection_twice() {
    const CONNECTIONS: usize = 10_000;
    const PORTS: u16 = 8;
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let addr = Lab::node_addr(false, API);
    // One connection older than the agent: the garbage collector has a seeded flow to check
    // (silent, socket alive) every 100 ms while the churn runs.
    let mut older = idle_connections(&lab, addr, 1);
    let agent = lab.start_agent(
        &[(BACKEND, &[API])],
        "quiet_period = \"50ms\"\nflow_idle_check = \"200ms\"",
        "ebpf",
    );
    assert_eq!(agent.count(BACKEND, "established"), 1);

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let socket = agent.socket.clone();
        std::thread::spawn(move || {
            let mut samples = 0;
            let mut worst = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(drain_agent_tests::agent_binary())
                    .args(["status", "--json", "--control-socket"])
                    .arg(&socket)
                    .output()
                    .unwrap();
                let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let backend = &status["backends"][0];
                let established = backend["established"].as_u64().unwrap();
                let in_flight = backend["in_flight"].as_u64().unwrap();
                // At most one connection per source port, plus the older one.
                assert!(
                    established <= u64::from(PORTS) + 1 && in_flight <= established,
                    "more than the true count: {backend}"
                );
                worst = (worst.0.max(established), worst.1.max(in_flight));
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (samples, worst)
        })
    };

    let client = lab.client.name().to_string();
    let workers: Vec<_> = (0..PORTS)
        .map(|index| {
            let client = client.clone();
            std::thread::spawn(move || {
                drain_agent_tests::enter_netns(&client);
                let local = SocketAddr::new(
                    drain_agent_tests::CLIENT_V4.parse().unwrap(),
                    41_000 + index,
                );
                let mut failures = 0;
                for round in 0..CONNECTIONS / PORTS as usize {
                    failures += usize::from(!churn_once(local, addr, round % 5 == 0));
                }
                failures
            })
        })
        .collect();
    let failures: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, worst) = sampler.join().unwrap();
    eprintln!(
        "{samples} status samples during the churn; highest established, in flight: {worst:?}"
    );
    assert_eq!(failures, 0, "requests failed");

    let backend = agent.wait_backend(BACKEND, Duration::from_secs(5), "the churn to end", |b| {
        b["established"] == 1 && b["in_flight"] == 0
    });
    assert_eq!(backend["accepted"], CONNECTIONS as u64, "{backend}");
    let ended = backend["closed"].as_u64().unwrap() + backend["reset"].as_u64().unwrap();
    assert_eq!(ended, CONNECTIONS as u64, "closed + reset: {backend}");
    assert_eq!(backend["vanished"], 0, "{backend}");
    assert_eq!(backend["flow_table_full"], 0, "{backend}");
    assert_eq!(backend["cut_in_flight"], 0, "{backend}");

    // The older connection still works, then ends; everything is back to zero.
    assert_eq!(older[0].get("/").unwrap().status, 200);
    drop(older.pop());
    let backend = agent.wait_backend(BACKEND, Duration::from_secs(3), "zero", |b| {
        b["established"] == 0 && b["in_flight"] == 0
    });
    assert_eq!(backend["idle"], 0, "{backend}");
    wait_until(
        Duration::from_secs(2),
        "the seeded entry to be deleted",
        || agent.status()["flow_table"]["entries"] == 0,
    );
}

/// One connection from `local` (reused: SO_REUSEADDR; the node recycles its TIME_WAIT socket
/// for the next SYN): a request with `Connection: close`, then either the normal close or an
/// abort (SO_LINGER 0). Retries the connect while the previous one on the port still lingers.
fn churn_once(local: SocketAddr, server: SocketAddr, abort: bool) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        let connected = socket
            .bind(&local.into())
            .and_then(|()| socket.connect(&server.into()));
        match connected {
            Ok(()) => break std::net::TcpStream::from(socket),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return false,
        }
    };
    let mut stream = stream;
    let request = if abort {
        "GET / HTTP/1.1\r\nHost: node\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
    };
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                if abort && complete(&response) {
                    break;
                }
            }
            Err(_) => return false,
        }
    }
    if abort {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200")
}

/// A whole response (head and Content-Length body) is in `data`.
fn complete(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|length| body.len() >= length)
}

#[test]
fn a_request_older_than_the_agent_holds_the_drain_until_it_is_answered() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let mut slow = lab.connect(Lab::node_addr(false, API));
    slow.send("/slow?ms=4000").unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the API is computing it
    let agent = lab.start_agent(
        &[(BACKEND, &[API])],
        "quiet_period = \"50ms\"\nagent_check_listen = \"127.0.0.1:9500\"\n\
         agent_check_interval = \"200ms\"",
        "ebpf",
    );
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["unknown"], 1, "the running request: {backend}");
    let report = drain_outlasts(&agent, &mut slow);
    assert_eq!(report["at_drain_start"]["unknown"], 1, "{report}");
    assert!(
        report["drain_evidence"]
            .as_str()
            .is_some_and(|evidence| evidence.contains("the kernel counted 0 requests in flight")),
        "{report}"
    );
}

#[test]
fn a_request_on_a_connection_set_up_while_the_programs_attach_holds_the_drain_until_answered() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    // Three seconds between attaching the packet programs and the sock_ops program.
    let mut agent = lab.spawn_agent(
        &[(BACKEND, &[API])],
        "quiet_period = \"50ms\"\nagent_check_listen = \"127.0.0.1:9500\"\n\
         agent_check_interval = \"200ms\"",
        "ebpf",
        &[("DRAIN_AGENT_TEST_ATTACH_DELAY_MS", "3000")],
    );
    // In that window: established, and its request sent, while only part of the kernel side
    // runs. Attached the other way round, the flow would start idle and miss its request.
    std::thread::sleep(Duration::from_millis(1500));
    let mut slow = lab.connect(Lab::node_addr(false, API));
    slow.send("/slow?ms=5000").unwrap();
    agent.wait_ready();
    let backend = agent.backend(BACKEND);
    assert_eq!(
        backend["idle"], 0,
        "a connection whose request nobody saw counted idle: {backend}"
    );
    let report = drain_outlasts(&agent, &mut slow);
    assert!(
        report["at_drain_start"]["unknown"].as_u64().unwrap_or(0)
            + report["at_drain_start"]["in_flight"].as_u64().unwrap_or(0)
            >= 1,
        "{report}"
    );
    let log = agent.log();
    let packet = log
        .find("attached packet program")
        .expect("packet programs attached");
    let sock_ops = log
        .find("attached sock_ops program")
        .expect("sock_ops attached");
    assert!(
        packet < sock_ops,
        "the packet programs attach first:\n{log}"
    );
}

#[test]
fn while_the_socket_table_cannot_be_read_a_drain_waits_for_evidence() {
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let mut slow = lab.connect(Lab::node_addr(false, API));
    slow.send("/slow?ms=5000").unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the API is computing it
    // The first six reads fail (about three seconds: the agent retries every half second),
    // so the connection older than the agent is unknown to it meanwhile.
    let mut agent = lab.spawn_agent(
        &[(BACKEND, &[API])],
        "quiet_period = \"50ms\"\nagent_check_listen = \"127.0.0.1:9500\"\n\
         agent_check_interval = \"200ms\"",
        "ebpf",
        &[("DRAIN_AGENT_TEST_FAIL_SOCKET_READS", "6")],
    );
    agent.wait_ready();
    // Not "no connection was left": without the socket table there is no evidence.
    let report = drain_outlasts(&agent, &mut slow);
    let evidence = report["drain_evidence"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !evidence.contains("no connection"),
        "the drain ended on a socket table it could not read: {report}"
    );
    let log = agent.log();
    assert!(log.contains("cannot read the socket table"), "{log}");
    assert!(log.contains("the socket table could be read"), "{log}");
}

#[test]
fn more_connections_than_flow_table_size_are_all_tracked_with_their_requests() {
    // flow_table_size sizes only the table of connections older than the agent: the ones the
    // kernel establishes while it watches live in their sockets' storage, which cannot fill.
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let agent = lab.start_agent(
        &[(BACKEND, &[API])],
        "quiet_period = \"50ms\"\nflow_table_size = 1024\n\
         agent_check_listen = \"127.0.0.1:9500\"\nagent_check_interval = \"200ms\"",
        "ebpf",
    );
    let addr = Lab::node_addr(false, API);
    let idle = idle_connections(&lab, addr, 1100);
    wait_for(&agent, "established", 1100, Duration::from_secs(5));
    let mut slow = lab.connect(addr);
    slow.send("/slow?ms=3000").unwrap();
    wait_for(&agent, "in_flight", 1, Duration::from_secs(2));
    let backend = agent.backend(BACKEND);
    assert_eq!(backend["established"], 1101, "{backend}");
    assert_eq!(backend["flow_table_full"], 0, "{backend}");
    assert_eq!(backend["unknown"], 0, "{backend}");
    drain_outlasts(&agent, &mut slow);
    drop(idle);
}
