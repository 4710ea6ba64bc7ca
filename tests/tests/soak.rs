//! The nightly soak (`cargo xtask soak --faults`), run by the suite, short and deterministic:
//! three rolling upgrades of three nodes under constant load through the VIP, with a fixed
//! seed (DRAIN_AGENT_SOAK_SEED replays another) so that the same faults fall on the same
//! cycles every run. Every fault kind must really be injected (none missed), every agent kill
//! must be followed by a reconciliation the restarted agent reports, no request may fail, and
//! every node must end serving on the last rollout's version.

use std::time::Duration;

use drain_agent_tests::{
    TempDir,
    soak::{self, FaultKind, SoakOptions},
    tier::{ApiTier, TierOptions, host_names},
    topology::Topology,
};

/// The suite's seed: fixed, so that the suite injects the same faults at the same points.
const SEED: u64 = 27;

#[test]
fn three_rolling_upgrades_with_every_fault_kind_lose_no_request_and_end_on_the_new_version() {
    let seed = std::env::var("DRAIN_AGENT_SOAK_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(SEED);
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
    assert_eq!(load["not_sent"], 0, "scheduled requests never sent: {load}");
    assert_eq!(load["non_2xx"], 0, "{}", load["status_codes"]);
    assert_eq!(report["probe"]["failed"], 0, "{}", report["probe"]);
    assert_eq!(report["rollouts_completed"], 3, "{}", report["problems"]);
    // Rollouts go to 1.1, 1.0, 1.1.
    for (node, version) in report["final_versions"].as_object().unwrap() {
        assert_eq!(version, "1.1", "{node}: {}", report["problems"]);
    }

    // Every kind really happened, and none was missed.
    for kind in FaultKind::ALL {
        let entry = &report["faults"][kind.name()];
        assert!(
            entry["injected"].as_u64().is_some_and(|n| n >= 1),
            "{} never injected: {entry}",
            kind.name()
        );
        assert_eq!(entry["missed"], 0, "{} missed: {entry}", kind.name());
    }
    let events = report["fault_events"].as_array().unwrap();
    assert!(events.len() >= FaultKind::ALL.len(), "{events:?}");
    // Every agent kill was followed by a reconciliation the restarted agent reported.
    let kills: Vec<_> = events
        .iter()
        .filter(|event| event["injection"]["agent_killed"] == true)
        .collect();
    assert!(kills.len() >= 2, "{events:?}");
    for kill in kills {
        assert_eq!(kill["reconciled"], true, "{kill}");
        assert!(
            kill["reconciliation"]["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{kill}"
        );
    }
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["ok"], true);
    let svg = std::fs::read_to_string(results.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "timeline incomplete");
    assert!(results.path().join("hosts/node1/agent.log").exists());
}
