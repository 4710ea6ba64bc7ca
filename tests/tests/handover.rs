//! The same-host handover: a new version takes every new connection while the old one
//! finishes its work, with and without a load balancer, a new version that never gets
//! healthy, and the agent killed in the middle.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use drain_agent_tests::{
    http::Connection,
    load::{Connections, Load},
    topology::{
        API_PORT, FRONTEND_PORT, HaproxyOptions, Host, Topology, handover_config,
        https_health_config, start_api, start_node_agent,
    },
    two_lbs::{tier, tier_with_options},
    wait_until,
};

/// A client and one API node with an agent that hands over; the API serves 1.0.
fn one_node() -> (Topology, drain_agent_tests::Agent) {
    let topology = Topology::new(&["client", "node"]);
    let node = topology.host("node");
    start_api(node, "1.0");
    let agent = start_node_agent(node, &[], &handover_config(), "");
    (topology, agent)
}

/// Versions that `count` requests, each on a new connection, were answered with.
fn versions_seen(client: &Host, target: SocketAddr, count: usize) -> Vec<String> {
    client.netns.run(move || {
        (0..count)
            .map(|_| {
                let mut connection = Connection::connect(target).unwrap();
                connection.get("/").unwrap().version.unwrap_or_default()
            })
            .collect()
    })
}

/// `/slow?ms=MS` on a connection of its own; the thread returns status and version.
fn slow_request(
    client: &Host,
    target: SocketAddr,
    ms: u64,
) -> std::thread::JoinHandle<(u16, String)> {
    let netns = client.netns.name().to_string();
    std::thread::spawn(move || {
        drain_agent_tests::enter_netns(&netns);
        let mut connection = Connection::connect(target).unwrap();
        let response = connection.get(&format!("/slow?ms={ms}")).unwrap();
        (response.status, response.version.unwrap_or_default())
    })
}

fn running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.split_whitespace()
            .nth(2)
            .is_none_or(|state| state != "Z")
    })
}

fn pids(report: &serde_json::Value, which: &str) -> Vec<i64> {
    report["handover"][which]
        .as_array()
        .unwrap_or_else(|| panic!("no {which} in {report}"))
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect()
}

#[test]
fn without_a_load_balancer_the_new_version_takes_every_new_connection_and_a_slow_request_ends_on_the_old_one()
 {
    let (topology, agent) = one_node();
    let node = topology.host("node");
    let client = topology.host("client");
    let target = node.addr(API_PORT);
    let slow = slow_request(client, target, 4000);
    let load = Load::start(
        &client.netns,
        client.dir.as_path(),
        &format!("http://{target}/"),
        200,
        Duration::from_secs(10),
        Connections::PerRequest(16),
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(node.dir.join("version"), "2.0").unwrap();
    let handover = agent.cli_in_background(&["handover", "api", "--json"]);
    // Status shows the two versions apart: the slow request on the old one, new connections
    // on the new one.
    let during = agent.wait_backend(
        "api",
        Duration::from_secs(20),
        "the slow request counted on the old version and connections on the new",
        |backend| {
            backend["state"] == "handing-over"
                && backend["versions"][1]["in_flight"].as_u64() >= Some(1)
                && backend["versions"][0]["established"].as_u64() >= Some(1)
        },
    );
    assert_eq!(during["versions"][1]["version"], "old", "{during}");
    let handover = handover.join().unwrap();
    assert_eq!(handover.code, Some(0), "{handover:?}\n{}", agent.log());
    let report = handover.json();
    assert_eq!(report["outcome"], "ok", "{report}");
    // The slow request held the old version: it was stopped only after it answered.
    let (status, version) = slow.join().unwrap();
    assert_eq!((status, version.as_str()), (200, "1.0"));
    assert!(
        report["handover"]["old_quiet_ms"].as_u64() >= report["handover"]["switched_ms"].as_u64(),
        "{report}"
    );
    for pid in pids(&report, "old_pids") {
        assert!(!running(pid), "old version pid {pid} still runs: {report}");
    }
    assert!(
        report["handover"]["accepted_by_new"].as_u64() > Some(0),
        "{report}"
    );
    let seen = versions_seen(client, target, 30);
    assert!(seen.iter().all(|version| version == "2.0"), "{seen:?}");
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1500);
}

#[test]
fn through_haproxy_with_keep_alive_pools_no_request_fails_during_a_handover_and_the_node_stays_up()
{
    // HAProxy keeps reusing its pooled connections to the old version, so under steady load
    // it is never quiet: drain_timeout stops it (gracefully) while the load goes on.
    let tier = tier(&format!("{}\ndrain_timeout = \"3s\"", handover_config()));
    let client = tier.topology.host("client");
    let lb1 = tier.topology.host("lb1").addr(FRONTEND_PORT);
    let load = Load::start(
        &client.netns,
        client.dir.as_path(),
        &format!("http://{lb1}/mix"),
        200,
        Duration::from_secs(16),
        // `/mix` averages ~110 ms: 200 req/s keep ~22 busy, with bursts of slow ones.
        Connections::KeepAlive(96),
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(tier.node("node1").dir.join("version"), "2.0").unwrap();
    let started = Instant::now();
    let handover = tier.agents[0].cli_in_background(&["handover", "api", "--json"]);
    while !handover.is_finished() {
        tier.assert_everywhere("node1", "UP");
        std::thread::sleep(Duration::from_millis(100));
    }
    let handover = handover.join().unwrap();
    assert_eq!(
        handover.code,
        Some(0),
        "{handover:?}\n{}",
        tier.agents[0].log()
    );
    eprintln!(
        "handover took {:?}: {}",
        started.elapsed(),
        handover.json()["handover"]
    );
    assert_eq!(tier.version_of("node1"), "2.0");
    tier.assert_everywhere("node1", "UP");
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1200);
}

#[test]
fn through_haproxy_to_a_tls_backend_with_http_reuse_always_no_request_fails_during_a_handover() {
    // HAProxy speaks TLS to the API and reuses its pooled connections to the old version
    // (`http-reuse always`) until they close: their TLS sessions end with the old process.
    // A request HAProxy sends on an idle TLS connection at the instant the agent closes it
    // (the session cannot be carried to the new version) is lost unless HAProxy retries it:
    // what docs/handover.md asks of a TLS backend with connection reuse.
    let options = HaproxyOptions {
        tls: true,
        retry_on: Some("conn-failure empty-response"),
        ..HaproxyOptions::default()
    };
    let tier = tier_with_options(
        &format!(
            "{}\n{}\ndrain_timeout = \"3s\"",
            handover_config(),
            https_health_config()
        ),
        "",
        &options,
    );
    let client = tier.topology.host("client");
    let lb1 = tier.topology.host("lb1").addr(FRONTEND_PORT);
    let load = Load::start(
        &client.netns,
        client.dir.as_path(),
        &format!("http://{lb1}/mix"),
        200,
        Duration::from_secs(16),
        // `/mix` averages ~110 ms: 200 req/s keep ~22 busy, with bursts of slow ones.
        Connections::KeepAlive(96),
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(tier.node("node1").dir.join("version"), "2.0").unwrap();
    let handover = tier.agents[0].cli_in_background(&["handover", "api", "--json"]);
    while !handover.is_finished() {
        tier.assert_everywhere("node1", "UP");
        std::thread::sleep(Duration::from_millis(100));
    }
    let handover = handover.join().unwrap();
    assert_eq!(
        handover.code,
        Some(0),
        "{handover:?}\n{}",
        tier.agents[0].log()
    );
    let report = handover.json();
    eprintln!("handover: {}", report["handover"]);
    tier.assert_everywhere("node1", "UP");
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1200);
}

/// What a client that uploads a body got.
#[derive(Debug)]
enum Upload {
    /// A response: its status and body.
    Answered(u16, String),
    /// The connection failed or closed before a response.
    Failed(String),
}

/// POSTs `total` bytes to `/upload` on a connection of its own, `piece` bytes every `every`,
/// while another thread reads whatever answer comes (a server may answer before the body
/// ends, and a relay would send its answer at once).
fn upload_slowly(
    client: &Host,
    target: SocketAddr,
    total: usize,
    piece: usize,
    every: Duration,
) -> std::thread::JoinHandle<Upload> {
    let netns = client.netns.name().to_string();
    std::thread::spawn(move || {
        drain_agent_tests::enter_netns(&netns);
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut reading = stream.try_clone().unwrap();
        reading
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                match reading.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buffer[..n]),
                    Err(err) if got.is_empty() => return Upload::Failed(err.to_string()),
                    Err(_) => break,
                }
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            if got.is_empty() {
                return Upload::Failed("closed without an answer".into());
            }
            let text = String::from_utf8_lossy(&got).to_string();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_string())
                .unwrap_or_default();
            Upload::Answered(status, body)
        });
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: api\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {total}\r\n\r\n"
        );
        let mut sent = stream.write_all(head.as_bytes()).map(|()| 0);
        let chunk = vec![b'x'; piece];
        while let Ok(done) = sent {
            if done >= total || reader.is_finished() {
                break;
            }
            std::thread::sleep(every);
            let n = piece.min(total - done);
            sent = stream.write_all(&chunk[..n]).map(|()| done + n);
        }
        eprintln!("upload: {sent:?} of {total} bytes sent");
        reader.join().unwrap()
    })
}

#[test]
fn a_large_body_sent_slowly_across_the_old_versions_stop_gets_its_own_answer_or_a_clean_error() {
    let topology = Topology::new(&["client", "node"]);
    let node = topology.host("node");
    let client = topology.host("client");
    // A stop lets requests in flight finish for 1 s only: the old version's worker is killed
    // while it reads the body, and the rest of the body arrives after it exited.
    std::fs::write(node.dir.join("graceful-timeout"), "1").unwrap();
    start_api(node, "1.0");
    let agent = start_node_agent(
        node,
        &[],
        &format!("{}\ndrain_timeout = \"1s\"", handover_config()),
        "",
    );
    let target = node.addr(API_PORT);
    // 4 MiB over about 10 s.
    let total = 4 << 20;
    let upload = upload_slowly(client, target, total, 32 << 10, Duration::from_millis(75));
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(node.dir.join("version"), "2.0").unwrap();
    let handover = agent.cli(&["handover", "api", "--json"]);
    assert_eq!(handover.code, Some(0), "{handover:?}\n{}", agent.log());
    let report = handover.json();
    eprintln!("handover: {}", report["handover"]);
    match upload.join().unwrap() {
        Upload::Answered(status, body) => assert_eq!(
            (status, body.as_str()),
            (200, format!("received {total}").as_str()),
            "the upload got an answer that is not its own"
        ),
        Upload::Failed(why) => {
            eprintln!("the upload failed cleanly: {why}");
            // Closed by the agent at the old version's exit, not relayed.
            assert!(
                report["handover"]["old_connections_closed"].as_u64() >= Some(1),
                "{report}"
            );
        }
    }
}

#[test]
fn a_new_version_that_never_gets_healthy_is_stopped_and_the_old_one_serves_throughout() {
    let (topology, agent) = one_node();
    let node = topology.host("node");
    let client = topology.host("client");
    let target = node.addr(API_PORT);
    let load = Load::start(
        &client.netns,
        client.dir.as_path(),
        &format!("http://{target}/"),
        200,
        Duration::from_secs(10),
        Connections::PerRequest(16),
    );
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(node.dir.join("version"), "broken-2.0").unwrap();
    let watching = {
        let netns = client.netns.name().to_string();
        std::thread::spawn(move || {
            drain_agent_tests::enter_netns(&netns);
            let until = Instant::now() + Duration::from_secs(8);
            let mut seen = Vec::new();
            while Instant::now() < until {
                let mut connection = Connection::connect(target).unwrap();
                seen.push(connection.get("/").unwrap().version.unwrap_or_default());
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    let handover = agent.cli(&["handover", "api", "--json"]);
    assert_eq!(handover.code, Some(5), "{handover:?}");
    let report = handover.json();
    assert_eq!(report["outcome"], "failed", "{report}");
    let message = report["message"].as_str().unwrap();
    assert!(message.contains("never got healthy"), "{message}");
    assert!(message.contains("status 503"), "{message}");
    for pid in pids(&report, "new_pids") {
        assert!(!running(pid), "new version pid {pid} still runs: {report}");
    }
    assert_eq!(report["handover"]["switched_ms"], serde_json::Value::Null);
    // While the agent probed it, no client connection reached it.
    let watched = watching.join().unwrap();
    assert!(watched.len() > 50, "{watched:?}");
    assert!(
        watched.iter().all(|version| version == "1.0"),
        "{watched:?}"
    );
    assert_eq!(agent.backend("api")["state"], "serving");
    let seen = versions_seen(client, target, 30);
    assert!(seen.iter().all(|version| version == "1.0"), "{seen:?}");
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1500);
}

#[test]
fn a_sigkill_of_the_agent_mid_handover_fails_no_request_both_versions_serve_and_the_restart_finishes_it()
 {
    let (topology, mut agent) = one_node();
    let node = topology.host("node");
    let client = topology.host("client");
    let target = node.addr(API_PORT);
    // Holds the old version (and so the handover) for a while after the switch.
    let slow = slow_request(client, target, 8000);
    let load = Load::start(
        &client.netns,
        client.dir.as_path(),
        &format!("http://{target}/"),
        200,
        Duration::from_secs(12),
        Connections::PerRequest(16),
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(node.dir.join("version"), "2.0").unwrap();
    let handover = agent.cli_in_background(&["handover", "api", "--json"]);
    // Switched: new connections reach the new version.
    wait_until(Duration::from_secs(20), "the switch", || {
        versions_seen(client, target, 1)[0] == "2.0"
    });
    agent.kill_and_restart();
    let cut = handover.join().unwrap();
    assert_ne!(cut.code, Some(0), "the CLI saw the agent go: {cut:?}");
    // The restarted agent finished the handover: the old version was stopped once its slow
    // request ended (its server's graceful stop), and only the new one answers.
    let (status, version) = slow.join().unwrap();
    assert_eq!((status, version.as_str()), (200, "1.0"));
    wait_until(
        Duration::from_secs(30),
        "only the new version answering",
        || {
            versions_seen(client, target, 20)
                .iter()
                .all(|version| version == "2.0")
        },
    );
    agent.wait_backend("api", Duration::from_secs(10), "serving", |backend| {
        backend["state"] == "serving"
    });
    assert!(
        agent.log().contains("reconciled an interrupted handover"),
        "{}",
        agent.log()
    );
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1500);
}

#[test]
fn a_listener_without_so_reuseport_is_named_by_check_config_and_the_handover_is_refused_unchanged()
{
    let lab = drain_agent_tests::Lab::new();
    // gunicorn without --reuse-port.
    let _api = lab.start_api(API_PORT);
    let config = format!(
        "interfaces = [\"eth0\"]\ncontrol_socket = \"{}\"\n[[backend]]\nname = \"api\"\n\
         ports = [{API_PORT}]\nhealth = {{ http = \"http://127.0.0.1:{API_PORT}/healthz\" }}\n\
         handover = {{ start = [\"/bin/true\"] }}\n",
        lab.dir.path().join("control.sock").display()
    );
    let agent = drain_agent_tests::start_agent_with_config(&lab.node, lab.dir.path(), &config);
    let refused = agent.cli(&["handover", "api"]);
    assert_eq!(refused.code, Some(3), "{refused:?}");
    assert!(
        refused.stderr.contains("does not set SO_REUSEPORT")
            && refused.stderr.contains("gunicorn --reuse-port"),
        "{refused:?}"
    );
    assert_eq!(agent.backend("api")["state"], "serving");
    let checked = lab
        .node
        .command_keeping_mounts(drain_agent_tests::agent_binary())
        .args(["check-config", "--online"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("backend[0].handover: backend `api`'s handover: the listener")
            && stdout.contains("does not set SO_REUSEPORT"),
        "{stdout}"
    );
}

#[test]
fn a_start_that_fails_after_it_began_listening_is_undone_and_what_it_left_is_stopped() {
    let topology = Topology::new(&["client", "node"]);
    let node = topology.host("node");
    let client = topology.host("client");
    start_api(node, "1.0");
    // The next version listens (SO_REUSEPORT, beside the old one), then the start fails.
    let start = format!(
        "handover = {{ start = [\"/bin/sh\", \"-c\", \"{} start-beside {} {API_PORT}; exit 1\"], timeout = \"20s\" }}",
        drain_agent_tests::topology::serve_api_script().display(),
        node.dir.display()
    );
    let agent = start_node_agent(node, &[], &start, "");
    std::fs::write(node.dir.join("version"), "2.0").unwrap();
    let handover = agent.cli(&["handover", "api", "--json"]);
    assert_eq!(handover.code, Some(5), "{handover:?}");
    let report = handover.json();
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("starting the new version failed"),
        "{report}"
    );
    // Left listening, it would take about half the new connections once the steering is
    // released: only the old version may answer.
    let target = node.addr(API_PORT);
    let seen = versions_seen(client, target, 40);
    assert!(seen.iter().all(|version| version == "1.0"), "{seen:?}");
    assert_eq!(agent.backend("api")["state"], "serving");
}

/// A service on two ports (SO_REUSEPORT): the first at once, the second `DELAY` seconds later.
const TWO_PORTS: &str = r#"
import http.server, socket, sys, threading, time
delay, version = float(sys.argv[1]), sys.argv[2]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("version %s\n" % version).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Api-Version", version)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

def serve(port):
    Server(("0.0.0.0", port), Handler).serve_forever()

threading.Thread(target=serve, args=(8774,), daemon=True).start()
time.sleep(delay)
serve(8775)
"#;

#[test]
fn a_handover_interrupted_before_the_new_listeners_were_seen_is_undone_with_the_new_version_stopped()
 {
    let topology = Topology::new(&["client", "node"]);
    let node = topology.host("node");
    let script = node.dir.join("two-ports.py");
    std::fs::write(&script, TWO_PORTS).unwrap();
    let mut old = node.netns.command("python3");
    old.arg(&script).args(["0", "1.0"]);
    let _old = drain_agent_tests::Process::spawn("two-ports 1.0", &mut old);
    for port in [8774, 8775] {
        let addr = node.addr(port);
        wait_until(
            Duration::from_secs(10),
            "the old version on both ports",
            || {
                topology.host("client").netns.run(move || {
                    Connection::connect(addr)
                        .and_then(|mut c| c.get("/"))
                        .is_ok()
                })
            },
        );
    }
    // The new version listens on 8774 at once and on 8775 only 20 s later: the agent, which
    // waits for both, is killed in between.
    let config = format!(
        "interfaces = [\"eth0\"]\ncontrol_socket = \"{dir}/control.sock\"\n\
         [[backend]]\nname = \"api\"\nports = [8774, 8775]\n\
         health = {{ http = \"http://127.0.0.1:8774/\", expect = 200, timeout = \"10s\" }}\n\
         handover = {{ start = [\"/bin/sh\", \"-c\", \"python3 {script} 20 2.0 >/dev/null 2>&1 &\"], timeout = \"60s\" }}\n",
        dir = node.dir.display(),
        script = script.display(),
    );
    let mut agent = drain_agent_tests::start_agent_with_config(&node.netns, &node.dir, &config);
    let handover = agent.cli_in_background(&["handover", "api"]);
    // The service itself, not the `sh -c` that started it (whose command line goes on).
    let pattern = format!("{} 20 2.0$", script.display());
    let new_pid = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| line.trim().parse::<i64>().ok())
    };
    wait_until(Duration::from_secs(10), "the new version started", || {
        new_pid().is_some()
    });
    let pid = new_pid().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    agent.kill_and_restart();
    let _ = handover.join();
    wait_until(
        Duration::from_secs(20),
        "the new version stopped by the reconciliation",
        || !running(pid),
    );
    wait_until(
        Duration::from_secs(10),
        "the reconciliation's report",
        || agent.log().contains("reconciled an interrupted handover"),
    );
    let log = agent.log();
    for words in [
        "undone",
        "found listening on the backend's ports",
        "was stopped",
    ] {
        assert!(log.contains(words), "{words:?} missing in {log}");
    }
    let target = node.addr(8775);
    let seen = versions_seen(topology.host("client"), target, 5);
    assert!(seen.iter().all(|version| version == "1.0"), "{seen:?}");
    assert_eq!(agent.backend("api")["state"], "serving");
}
