//! "Drained" and "back in service" are claims the load balancers must confirm: real HAProxy
//! that learns the server's state from agent-check alone (no runtime API in the agents), real
//! API nodes restarted by a service script, and oha counting every failed request.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use drain_agent_tests::{
    agent_check_only::{self, Tier},
    load::{Connections, Load},
    topology::{AGENT_CHECK_PORT, FRONTEND_PORT, Host},
    wait_until,
};
use serde_json::Value;

/// HAProxy's `agent-inter` in these tests, and the agents' `agent_check_interval`.
const AGENT_INTER: Duration = Duration::from_secs(2);

/// client, lb1, node1, node2; HAProxy polls the agents every 2 s and retries nothing; the
/// agents know no runtime API.
fn agent_check_only_tier(extra_backend: &str) -> Tier {
    agent_check_only::tier(extra_backend, "2s", 0)
}

fn poller_entries(report: &Value) -> Vec<Value> {
    report["load_balancers"]
        .as_array()
        .unwrap_or_else(|| panic!("no load_balancers in {report}"))
        .iter()
        .filter(|lb| lb["via"] == "agent-check")
        .cloned()
        .collect()
}

#[test]
fn with_agent_check_only_a_drain_returns_after_haproxy_shows_the_server_drained() {
    let tier = agent_check_only_tier("");
    let outcome = tier.agents[0].cli(&["drain", "api", "--wait", "--json"]);
    // Read HAProxy's view before anything else can poll.
    let status = tier.lb.status("node1");
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(
        status.starts_with("DRAIN") || status.starts_with("MAINT"),
        "`drain --wait` returned while HAProxy still had node1 {status}: {}",
        outcome.stdout
    );
    let report = outcome.json();
    let pollers = poller_entries(&report);
    let lb1 = format!("agent-check poller {}", tier.topology.host("lb1").v4);
    assert!(
        pollers
            .iter()
            .any(|p| p["name"] == lb1.as_str() && p["drain_confirmed_ms"].is_u64()),
        "the report does not show {lb1} confirming the drain: {report}"
    );
    assert!(
        report["drain_evidence"].is_string(),
        "no drain evidence: {report}"
    );
    let resumed = tier.agents[0].cli(&["resume", "api", "--json"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    assert!(
        poller_entries(&resumed.json())
            .iter()
            .any(|p| p["ready_confirmed_ms"].is_u64()),
        "resume did not wait for the poller: {}",
        resumed.stdout
    );
    assert_eq!(tier.lb.status("node1"), "UP");
}

#[test]
fn back_to_back_cycles_behind_an_agent_check_only_haproxy_lose_no_request() {
    let tier = agent_check_only_tier("");
    let client = tier.topology.host("client");
    let url = format!("http://{}:{FRONTEND_PORT}/", tier.topology.host("lb1").v4);
    let load = Load::start(
        &client.netns,
        &client.dir,
        &url,
        300,
        Duration::from_secs(25),
        Connections::KeepAlive(32),
    );
    std::thread::sleep(Duration::from_secs(1));
    for (index, node) in ["node1", "node2"].into_iter().enumerate() {
        std::fs::write(tier.topology.host(node).dir.join("version"), "2.0").unwrap();
        let outcome = tier.agents[index].cli(&["cycle", "api", "--json"]);
        // What HAProxy shows the moment the cycle returned, before the next one starts.
        let status = tier.lb.status(node);
        assert_eq!(outcome.code, Some(0), "cycle {node}: {outcome:?}");
        let report = outcome.json();
        eprintln!("cycle {node}: {report}");
        assert!(
            status.starts_with("UP"),
            "cycle {node} returned while HAProxy had it {status}"
        );
        let pollers = poller_entries(&report);
        assert!(
            !pollers.is_empty()
                && pollers
                    .iter()
                    .all(|p| p["ready_confirmed_ms"].is_u64() && p["drain_confirmed_ms"].is_u64()),
            "cycle {node}: the report lacks the poller's confirmations: {report}"
        );
    }
    load.finish(Duration::from_secs(60))
        .assert_no_failures(3000);
}

#[test]
fn a_load_balancer_that_stops_polling_during_a_cycle_is_named_and_nothing_hangs() {
    let tier = agent_check_only_tier("");
    let node1: &Host = tier.topology.host("node1");
    std::fs::write(node1.dir.join("restart-delay"), "2").unwrap();
    let cycle = tier.agents[0].cli_in_background(&["cycle", "api", "--json"]);
    wait_until(Duration::from_secs(10), "node1 restarting", || {
        tier.agents[0].backend("api")["state"] == "restarting"
    });
    tier.lb.process.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    let outcome = cycle.join().unwrap();
    let took = killed.elapsed();
    assert_eq!(outcome.code, Some(7), "{outcome:?}");
    let lb1 = format!("agent-check poller {}", tier.topology.host("lb1").v4);
    assert!(
        outcome.stderr.contains(&lb1) && outcome.stderr.contains("did not confirm"),
        "the failure does not name {lb1}: {outcome:?}"
    );
    // The return waits for the dead poller at most two agent_check_intervals and the grace.
    let report: Value = serde_json::from_str(&outcome.stdout).unwrap();
    let back_at = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|phase| phase["phase"] == "serving")
        .and_then(|phase| phase["started_ms"].as_u64())
        .unwrap_or_else(|| panic!("no return in {report}"));
    let waited = Duration::from_millis(report["total_ms"].as_u64().unwrap() - back_at);
    eprintln!("HAProxy died {took:?} before the cycle ended; the return waited {waited:?}");
    assert!(
        waited <= AGENT_INTER * 2 + Duration::from_millis(1500),
        "the return waited {waited:?} for a load balancer that had died"
    );
    assert_eq!(tier.agents[0].backend("api")["state"], "serving");
}

/// Opens `count` connections to `addr` and keeps them idle (never sends); returns them.
fn idle_flood(client: &drain_agent_tests::Netns, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    client.run(move || {
        (0..count)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            .collect()
    })
}

#[test]
fn two_thousand_idle_connections_to_the_agent_check_port_do_not_silence_it() {
    let tier = agent_check_only_tier("");
    let node1 = tier.topology.host("node1");
    let agent_check = node1.addr(AGENT_CHECK_PORT);
    let flood = idle_flood(&tier.topology.host("client").netns, agent_check, 2000);
    eprintln!("{} idle connections open", flood.len());
    assert!(flood.len() >= 1900, "could not open the flood");

    // HAProxy's kind of check from the load balancer's address, and the control socket.
    let mut check_times = Vec::new();
    let mut status_times = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let answer = tier.topology.host("lb1").netns.run(move || {
            let mut stream = TcpStream::connect_timeout(&agent_check, Duration::from_secs(2))
                .expect("connect to the agent-check port");
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            stream.write_all(b"api\n").unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        });
        check_times.push(started.elapsed());
        assert_eq!(answer, "up\n", "at rest the answer carries no admin word");
        let started = Instant::now();
        assert!(
            tier.agents[0].try_status().is_some(),
            "status did not answer"
        );
        status_times.push(started.elapsed());
    }
    check_times.sort();
    status_times.sort();
    eprintln!("agent check answers: {check_times:?}; status: {status_times:?}");
    let median = |times: &[Duration]| times[times.len() / 2];
    assert!(
        median(&check_times) < Duration::from_millis(100),
        "agent checks slowed by the flood: {check_times:?}"
    );
    // `status` is a CLI process start plus one request.
    assert!(
        median(&status_times) < Duration::from_millis(100),
        "the control socket slowed by the flood: {status_times:?}"
    );
    drop(flood);
    assert_eq!(tier.lb.status("node1"), "UP");
}
