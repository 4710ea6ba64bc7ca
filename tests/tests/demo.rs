//! The demo's scenario, shortened for CI: two API nodes, both load balancers with keepalived,
//! a VIP failover halfway, constant load from oha. No request may fail, and every node must end
//! on the new version.

use std::{net::SocketAddr, time::Duration};

use drain_agent_tests::{
    TempDir,
    demo::{self, DemoOptions},
    http::Connection,
    tier::{ApiTier, VIP, host_names},
    topology::{FRONTEND_PORT, Topology},
    wait_until,
};

/// Runs the demo on two nodes at 150 requests/s and checks what every run must show: at least
/// `min_requests`, none failed, none answered with an error. Returns the report and where its
/// results are.
fn demo_without_loss(
    duration: Duration,
    failover: bool,
    handover: bool,
    min_requests: u64,
) -> (serde_json::Value, TempDir) {
    let names = host_names(2);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let tier = ApiTier::start(Topology::new(&names), 2, "1.0");
    let results = TempDir::new(if handover {
        "demo-handover-results"
    } else {
        "demo-results"
    });
    let report = demo::run(
        &tier,
        &DemoOptions {
            rate: 150,
            duration,
            to_version: "1.1".into(),
            failover,
            results: results.path().to_path_buf(),
            handover,
        },
    );
    eprintln!("{}", demo::summary(&report));
    let load = &report["load"];
    assert!(load["requests"].as_u64().unwrap() >= min_requests, "{load}");
    assert_eq!(load["failed"], 0, "failed requests: {}", load["errors"]);
    assert_eq!(load["non_2xx"], 0, "{load}");
    (report, results)
}

#[test]
fn rolling_upgrade_with_a_vip_failover_loses_no_request() {
    let (report, results) = demo_without_loss(Duration::from_secs(30), true, false, 4000);
    assert_eq!(
        report["failover"]["vip_moved_to"], "lb2",
        "{}",
        "timeline incomplete"
    );
    assert!(results.path().join("report.json").exists());
}

#[test]
fn a_rolling_upgrade_by_handovers_keeps_every_node_in_rotation_and_loses_no_request() {
    let (report, results) = demo_without_loss(Duration::from_secs(25), false, true, 3000);
    for (node, version) in report["final_versions"].as_object().unwrap() {
        assert_eq!(version, "1.1", "{node}");
    }
    // The capacity kept: every server in rotation in every sample.
    let capacity = &report["capacity"];
    assert_eq!(capacity["min_in_rotation"], 2, "{capacity}");
    assert_eq!(
        capacity["server_seconds_out_of_rotation"], 0.0,
        "{capacity}"
    );
    assert_eq!(report["ok"], true);
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
