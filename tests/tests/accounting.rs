//! Kernel connection accounting against ground truth: real kernel programs on a veth, gunicorn
//! serving a keep-alive API, real TCP clients, and `ss` in the node namespace.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use drain_agent_tests::{Agent, Lab, command_output, http::Connection, wait_until};

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
        assert_eq!(agent.count(BACKEND, "in_flight"), 1, "after {read} bytes");
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
        "sock_ops on the cgroup root, ingress and egress on eth0: {status}"
    );
    assert_eq!(
        status["attachments"][0]["direction"], "sock_ops",
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

    // A new request on an old connection is seen from its first byte.
    connections[0].send("/slow?ms=1000").unwrap();
    wait_for(&agent, "in_flight", 1, Duration::from_millis(500));
    // The request that was already running shows up once its response starts; all end idle.
    assert_eq!(slow.read_response().unwrap().status, 200);
    assert_eq!(connections[0].read_response().unwrap().status, 200);
    wait_for(&agent, "in_flight", 0, QUIET + MARGIN);
    assert_eq!(agent.count(BACKEND, "idle"), 6);
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
