//! What the agent did not see begin is unknown, not idle: behind real HAProxy with pooled
//! keep-alive connections, an agent (re)started under traffic, and the degraded procfs mode.
//! The drain must end on evidence it names, and only then.

use std::time::{Duration, Instant};

use drain_agent_tests::{
    http::Connection,
    topology::FRONTEND_PORT,
    two_lbs::{Tier, tier},
    wait_until,
};
use serde_json::Value;

/// Sends `count` requests through lb1 pinned to node1, so HAProxy keeps pooled idle
/// connections to it (`http-reuse always`).
fn warm_node1_pool(tier: &Tier, count: usize) {
    let lb1 = tier.topology.host("lb1").addr(FRONTEND_PORT);
    tier.topology.host("client").netns.run(move || {
        let mut connections: Vec<Connection> = (0..count)
            .map(|_| Connection::connect(lb1).unwrap())
            .collect();
        for connection in &mut connections {
            connection
                .send_raw("GET / HTTP/1.1\r\nHost: api\r\nx-node: node1\r\n\r\n")
                .unwrap();
        }
        for connection in &mut connections {
            assert_eq!(connection.read_response().unwrap().status, 200);
        }
    });
}

fn drain_report(tier: &Tier) -> (Value, Duration) {
    let started = Instant::now();
    let outcome = tier.agents[0].cli(&["drain", "api", "--wait", "--json"]);
    let took = started.elapsed();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    (outcome.json(), took)
}

#[test]
fn after_an_agent_restart_pooled_connections_are_unknown_and_haproxys_zero_sessions_end_the_drain()
{
    let mut tier = tier("");
    warm_node1_pool(&tier, 4);
    // The agent restarts with HAProxy's idle pooled connections already open.
    tier.agents[0].kill_and_restart();
    // HAProxy's health checks (every 500 ms, a new connection each) are briefly in flight
    // themselves: wait for a moment between them.
    let backend = tier.agents[0].wait_backend(
        "api",
        Duration::from_secs(3),
        "a moment with no health check in flight",
        |backend| backend["in_flight"] == 0,
    );
    let unknown = backend["unknown"].as_u64().unwrap();
    assert!(
        unknown >= 1,
        "pooled connections must be unknown: {backend}"
    );
    let (report, took) = drain_report(&tier);
    eprintln!("drained in {took:?}: {}", report["drain_evidence"]);
    let evidence = report["drain_evidence"].as_str().unwrap_or_default();
    assert!(
        evidence.contains("every load balancer showed 0 sessions")
            && evidence.contains("did not see begin"),
        "{report}"
    );
    // Promptly: on the load balancers' word, not at drain_timeout (2 minutes).
    assert!(took < Duration::from_secs(10), "the drain took {took:?}");
    assert_eq!(tier.agents[0].cli(&["resume", "api"]).code, Some(0));
}

#[test]
fn in_procfs_mode_a_request_in_flight_holds_the_drain_and_zero_sessions_end_it() {
    let mut tier = tier("drain_timeout = \"30s\"");
    tier.agents[0].restart_in_mode("procfs");
    warm_node1_pool(&tier, 3);
    let status = tier.agents[0].status();
    assert_eq!(status["kernel"], "procfs");
    let backend = &status["backends"][0];
    assert_eq!(backend["unknown"], backend["established"], "{backend}");

    // A request mid-flight: HAProxy has a session on node1 until it is answered.
    let slow = tier.slow_request_to_node1(3000);
    wait_until(Duration::from_secs(3), "HAProxy's session on node1", || {
        tier.lbs[0].stat("node1", "scur") == "1"
    });
    let started = Instant::now();
    let (report, _) = drain_report(&tier);
    let drained = started.elapsed();
    assert_eq!(slow.join().unwrap(), 200);
    assert!(
        drained >= Duration::from_millis(2000),
        "procfs drain ended after {drained:?}, with the request still running"
    );
    let evidence = report["drain_evidence"].as_str().unwrap_or_default();
    assert!(
        evidence.contains("procfs mode (in-flight unknown)"),
        "{report}"
    );
    assert_eq!(tier.agents[0].cli(&["resume", "api"]).code, Some(0));

    // Idle keep-alive connections and 0 sessions: the drain ends promptly.
    warm_node1_pool(&tier, 3);
    let (report, took) = drain_report(&tier);
    assert!(took < Duration::from_secs(10), "took {took:?}: {report}");
    assert_eq!(tier.agents[0].cli(&["resume", "api"]).code, Some(0));
}
