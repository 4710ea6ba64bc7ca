//! The nightly soak (`cargo xtask soak --rollouts 3 --faults`), run by the suite: three rolling
//! upgrades of three nodes under constant load through the VIP, with faults at random points
//! (the seed is printed; DRAIN_AGENT_SOAK_SEED replays one). No request may fail, and every
//! node must end serving on the last rollout's version.

use std::time::Duration;

use drain_agent_tests::{
    TempDir,
    soak::{self, SoakOptions},
    tier::{ApiTier, TierOptions, host_names},
    topology::Topology,
};

#[test]
fn three_rolling_upgrades_with_random_faults_lose_no_request_and_end_on_the_new_version() {
    let seed = std::env::var("DRAIN_AGENT_SOAK_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(soak::fresh_seed);
    eprintln!("soak test: seed {seed} (replay with DRAIN_AGENT_SOAK_SEED={seed})");
    let names = host_names(3);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut tier = ApiTier::start_with(
        Topology::new(&names),
        3,
        "1.0",
        &TierOptions {
            nopreempt: true,
            rollback: true,
            ..TierOptions::default()
        },
    );
    let results = TempDir::new("soak-results");
    let report = soak::run(
        &mut tier,
        &SoakOptions {
            rollouts: 3,
            rate: 300,
            connections: 256,
            faults: true,
            fault_probability: 0.5,
            seed,
            min_rollout: Duration::ZERO,
            window: Duration::from_secs(10),
            results: results.path().to_path_buf(),
        },
    );
    drop(tier);
    eprintln!("{}", soak::summary(&report));
    let load = &report["load"];
    assert!(load["requests"].as_u64().unwrap() >= 5000, "{load}");
    assert_eq!(load["failed"], 0, "failed requests: {}", load["errors"]);
    assert_eq!(load["non_2xx"], 0, "{}", load["status_codes"]);
    assert_eq!(report["probe"]["failed"], 0, "{}", report["probe"]);
    assert_eq!(report["rollouts_completed"], 3, "{}", report["problems"]);
    // Rollouts go to 1.1, 1.0, 1.1.
    for (node, version) in report["final_versions"].as_object().unwrap() {
        assert_eq!(version, "1.1", "{node}: {}", report["problems"]);
    }
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["ok"], true);
    let svg = std::fs::read_to_string(results.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "timeline incomplete");
    assert!(results.path().join("hosts/node1/agent.log").exists());
}
