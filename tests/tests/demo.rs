//! The demo's scenario, shortened for CI: two API nodes, both load balancers with keepalived,
//! constant load from oha. The API's stop cuts what it has in flight, so that only a drain
//! that really waits loses nothing: first the same upgrade without the agent (it must lose
//! requests), then with it (none lost, nothing retried by HAProxy, every node on the new
//! version); and a negative control whose drains do not wait, which must lose requests too.

use std::{net::SocketAddr, time::Duration};

use drain_agent_tests::{
    TempDir,
    demo::{self, DemoOptions},
    http::Connection,
    tier::{ApiTier, TierOptions, VIP, host_names},
    topology::{FRONTEND_PORT, Topology},
    wait_until,
};
use serde_json::Value;

/// A two-node tier whose API stop cuts the requests in flight (and, with
/// `drain_without_waiting`, whose drains do not wait for them); runs the demo on it at 150
/// requests/s for `seconds`, first the baseline when asked.
fn demo_on_a_tier_that_cuts(
    seconds: u64,
    drain_without_waiting: bool,
    baseline: bool,
    failover: bool,
    handover: bool,
) -> (Value, TempDir) {
    let names = host_names(2);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let tier = ApiTier::start_with(
        Topology::new(&names),
        2,
        "1.0",
        &TierOptions {
            stop_cuts_requests: !handover,
            drain_without_waiting,
            ..TierOptions::default()
        },
    );
    let results = TempDir::new("demo-results");
    let report = demo::run(
        &tier,
        &DemoOptions {
            rate: 150,
            duration: Duration::from_secs(seconds),
            to_version: "1.2".into(),
            failover,
            results: results.path().to_path_buf(),
            handover,
            baseline: baseline.then(|| "1.1".to_string()),
        },
    );
    eprintln!("{}", demo::summary(&report));
    (report, results)
}

/// What a run that loses nothing shows: every scheduled request sent and answered with a 2xx,
/// nothing HAProxy had to hide (retries, redispatches, connection or response errors, server
/// aborts), every node's operation exit 0 (or 7 naming only the load balancer the demo
/// stopped), every node on `version`, and `ok`.
fn assert_lost_nothing(report: &Value, version: &str, min_requests: u64) {
    let load = &report["load"];
    assert!(load["sent"].as_u64().unwrap() >= min_requests, "{load}");
    assert_eq!(load["failed"], 0, "failed requests: {}", load["errors"]);
    assert_eq!(load["non_2xx"], 0, "{load}");
    assert_eq!(load["not_sent"], 0, "scheduled requests never sent: {load}");
    assert_eq!(load["sent"], load["scheduled"], "{load}");
    let hidden = &report["haproxy"]["total"];
    for key in [
        "retries",
        "redispatches",
        "connection_errors",
        "response_errors",
        "server_aborts",
    ] {
        assert_eq!(hidden[key], 0, "HAProxy {key}: {}", report["haproxy"]);
    }
    for node in report["nodes"].as_array().unwrap() {
        let code = node["exit_code"].as_i64();
        assert!(
            code == Some(0) || (code == Some(7) && !report["failover"].is_null()),
            "{}: exit {code:?}: {}",
            node["name"],
            node["report"]["message"]
        );
    }
    let versions = report["final_versions"].as_object().unwrap();
    assert_eq!(versions.len(), 2);
    for (node, final_version) in versions {
        assert_eq!(final_version, version, "{node}");
    }
    assert_eq!(report["ok"], true, "{}", report["load"]);
}

#[test]
fn rolling_upgrade_with_a_vip_failover_loses_no_request_where_restarts_alone_lose_some() {
    let (report, results) = demo_on_a_tier_that_cuts(25, false, true, true, false);
    // Without the agent: the same upgrade under the same load loses requests, or HAProxy
    // hides some (retried, redispatched): otherwise this tier proves nothing.
    let baseline = &report["baseline"];
    let lost = |key: &str| baseline["load"][key].as_u64().unwrap();
    let hidden = |key: &str| baseline["haproxy"]["total"][key].as_u64().unwrap();
    let baseline_cost = lost("failed")
        + lost("non_2xx")
        + lost("not_sent")
        + hidden("retries")
        + hidden("redispatches");
    assert!(baseline_cost > 0, "the baseline lost nothing: {baseline}");
    assert_eq!(baseline["operation"], "restart");
    assert_eq!(baseline["ok"], false, "{baseline}");
    // The same shape as the agent's run.
    for key in ["load", "haproxy", "nodes", "final_versions", "capacity"] {
        assert!(
            !baseline[key].is_null(),
            "baseline without {key}: {baseline}"
        );
    }
    // With the agent: nothing lost, nothing hidden.
    assert_lost_nothing(&report, "1.2", 3000);
    assert_eq!(report["operation"], "cycle");
    assert_eq!(
        report["failover"]["vip_moved_to"], "lb2",
        "{}",
        report["failover"]
    );
    for node in report["nodes"].as_array().unwrap() {
        assert!(node["drain_ms"].is_u64(), "{node}");
        assert_eq!(node["cut_in_flight"], 0, "{node}");
    }
    // The timeline shows the cycles and the failover, and the baseline's own.
    let svg = std::fs::read_to_string(results.path().join("timeline.svg")).unwrap();
    for mark in ["draining", "restarting", "VIP"] {
        assert!(svg.contains(mark), "timeline without {mark}");
    }
    assert!(results.path().join("baseline/timeline.svg").exists());
    assert!(results.path().join("report.json").exists());
}

#[test]
fn the_negative_control_a_drain_that_does_not_wait_loses_requests() {
    // The same tier and load; the agents' drains end as soon as the load balancers confirm
    // them, and the restart cuts what is in flight. If this lost nothing, the demo above
    // could not tell a drain that waits from one that does not.
    let (report, _results) = demo_on_a_tier_that_cuts(20, true, false, false, false);
    let load = &report["load"];
    let lost = load["failed"].as_u64().unwrap() + load["non_2xx"].as_u64().unwrap();
    assert!(lost > 0, "a drain that does not wait lost nothing: {load}");
    assert_eq!(report["ok"], false);
}

#[test]
fn a_rolling_upgrade_by_handovers_keeps_every_node_in_rotation_and_loses_no_request() {
    let (report, results) = demo_on_a_tier_that_cuts(25, false, false, false, true);
    assert_lost_nothing(&report, "1.2", 3000);
    // The capacity kept: every server in rotation in every sample.
    let capacity = &report["capacity"];
    assert_eq!(capacity["min_in_rotation"], 2, "{capacity}");
    assert_eq!(
        capacity["server_seconds_out_of_rotation"], 0.0,
        "{capacity}"
    );
    let svg = std::fs::read_to_string(results.path().join("timeline.svg")).unwrap();
    assert!(
        svg.contains("handing-over"),
        "timeline without the handover"
    );
}

#[test]
fn lab_down_removes_everything_the_lab_created() {
    use drain_agent_tests::{command_output, lab};
    let name = lab::LabName {
        prefix: format!("dalabt{}", std::process::id()),
        dir: std::env::temp_dir().join(format!("drain-agent-labtest-{}", std::process::id())),
    };
    // `up` leaves everything running, as if the process that started it had died.
    let guide = lab::up(&name, 1);
    assert!(guide.contains("ip netns exec"), "{guide}");
    let namespaces = || {
        String::from_utf8_lossy(&command_output("ip", &["netns", "list"]).stdout)
            .lines()
            .filter(|line| line.starts_with(&name.prefix))
            .count()
    };
    let processes = || {
        let out = command_output("pgrep", &["-af", name.dir.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(namespaces(), 5, "switch, client, lb1, lb2, node1");
    assert!(
        processes().len() >= 5,
        "haproxy, keepalived, gunicorn, drain-agent should run: {:?}",
        processes()
    );
    let status = lab::status(&name);
    assert!(
        status.contains("holds the VIP") && status.contains("serving"),
        "{status}"
    );

    let removed = lab::down(&name);
    assert!(removed.len() >= 6, "{removed:?}");
    assert_eq!(namespaces(), 0, "namespaces left behind");
    assert_eq!(processes(), Vec::<String>::new(), "processes left behind");
    assert!(!name.dir.exists(), "the lab directory was left behind");
    let links = String::from_utf8_lossy(&command_output("ip", &["-o", "link"]).stdout).into_owned();
    assert!(
        !links.contains("br0") && !links.contains("@"),
        "links left in the root namespace: {links}"
    );
    assert!(lab::down(&name).is_empty(), "a second down finds nothing");
}

#[test]
fn a_request_whose_last_bytes_cross_a_vip_failover_is_answered_by_the_old_load_balancer() {
    let names = host_names(2);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let tier = ApiTier::start(Topology::new(&names), 2, "1.0");
    let vip = SocketAddr::new(VIP.into(), FRONTEND_PORT);
    let client = tier.topology.host("client");
    let mut connection = client
        .netns
        .run(move || Connection::connect(vip))
        .expect("connect to the VIP");
    // The request's head, all but its last line: lb1's HAProxy waits for the rest.
    connection
        .send_raw("GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n")
        .unwrap();
    // The demo's failover: lb1's HAProxy stops gracefully, keepalived moves the VIP to lb2.
    tier.lb("lb1")
        .process
        .signal(nix::sys::signal::Signal::SIGUSR1);
    wait_until(Duration::from_secs(15), "the VIP to move to lb2", || {
        tier.vip_holder().as_deref() == Some("lb2")
    });
    // The last line now reaches lb2 first, which has no such connection.
    connection.send_raw("\r\n").unwrap();
    let response = connection
        .read_response()
        .expect("the request that crossed the failover failed");
    assert_eq!(response.status, 200);
}
