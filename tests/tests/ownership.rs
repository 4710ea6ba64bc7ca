//! The operator owns the load balancer (docs/operations.md#who-owns-the-servers-state): a
//! MAINT or DRAIN set by hand stands while the agent is at rest, and drain, cycle and resume
//! refuse to take it over; what the agent itself holds out survives a reload of HAProxy; a
//! cycle from `drained` proves the drain again; a restarted agent's reconciliation gives way
//! to an operator's `resume`; a torn journal never returns a server silently; one agent per
//! state directory.

use std::time::{Duration, Instant};

use drain_agent_tests::{
    Agent, CliOutcome, Lab, agent_check_only,
    topology::{Haproxy, HaproxyOptions, RUNTIME_API_PORT, haproxy_config_with},
    two_lbs::{tier, tier_with, tier_with_options},
    wait_until,
};

/// What a refused CLI said, both streams.
fn said(outcome: &CliOutcome) -> String {
    format!("{}{}", outcome.stdout, outcome.stderr)
}

fn drift(agent: &Agent) -> String {
    agent.backend("api")["drift"].to_string()
}

#[test]
fn an_operators_maint_and_drain_stand_at_rest_and_drain_cycle_and_resume_refuse_to_take_them_over()
{
    let tier = tier("drain_timeout = \"30s\"");
    let agent = &tier.agents[0];
    tier.lbs[0].command("disable server api/node1");
    tier.lbs[1].command("set server api/node1 state drain");
    // Six agent-check polls (agent-inter 500 ms) and three drift checks later.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        tier.lbs[0].status("node1").starts_with("MAINT"),
        "the operator's MAINT on lb1 was undone: {}",
        tier.lbs[0].status("node1")
    );
    assert!(
        tier.lbs[1].status("node1").starts_with("DRAIN"),
        "the operator's DRAIN on lb2 was undone: {}",
        tier.lbs[1].status("node1")
    );
    wait_until(Duration::from_secs(5), "the drift reported", || {
        let drift = drift(agent);
        drift.contains("lb1") && drift.contains("lb2")
    });
    assert!(
        drift(agent).contains("somebody else took it out"),
        "{}",
        drift(agent)
    );

    for args in [
        &["drain", "api", "--wait"][..],
        &["cycle", "api"],
        &["resume", "api"],
    ] {
        let refused = agent.cli(args);
        let words = said(&refused);
        assert_eq!(refused.code, Some(3), "{args:?}: {words}");
        for expected in [
            "held out of rotation by someone else",
            "lb1 holds it MAINT",
            "lb2 holds it DRAIN",
            "set server api/node1 state ready",
        ] {
            assert!(
                words.contains(expected),
                "{args:?}: {expected:?} missing in {words}"
            );
        }
    }
    assert_eq!(agent.backend("api")["state"], "serving");
    assert!(tier.lbs[0].status("node1").starts_with("MAINT"));
    assert!(tier.lbs[1].status("node1").starts_with("DRAIN"));

    // The operator returns it: the agent's own drain and resume work again.
    tier.lbs[0].command("enable server api/node1");
    tier.lbs[1].command("set server api/node1 state ready");
    for lb in &tier.lbs {
        wait_until(Duration::from_secs(10), "node1 UP again", || {
            lb.status("node1") == "UP"
        });
    }
    let drained = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    tier.assert_everywhere("node1", "MAINT");
    let resumed = agent.cli(&["resume", "api", "--json"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    for lb in &tier.lbs {
        wait_until(Duration::from_secs(10), "node1 UP after resume", || {
            lb.status("node1") == "UP"
        });
    }
    // Once every poller confirmed the return, the agent owes no `ready`: a new MAINT by hand
    // stands again.
    std::thread::sleep(Duration::from_secs(2));
    tier.lbs[0].command("disable server api/node1");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        tier.lbs[0].status("node1").starts_with("MAINT"),
        "a MAINT set after the agent's return was undone: {}\n{}",
        tier.lbs[0].status("node1"),
        agent.log()
    );
}

#[test]
fn the_agents_own_drain_survives_a_haproxy_restart_through_the_runtime_api_and_agent_check() {
    let mut tier = tier("");
    let drained = tier.agents[0].cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    tier.assert_everywhere("node1", "MAINT");
    // Let the drift check see each HAProxy process hold the agent's MAINT.
    std::thread::sleep(Duration::from_secs(2));
    // lb1 comes back with agent checks and the runtime API, lb2 with the runtime API only:
    // either way HAProxy starts with every server in rotation (runtime state is lost).
    for (index, name, agent_check) in [(0, "lb1", true), (1, "lb2", false)] {
        let host = tier.topology.host(name);
        let nodes = [tier.topology.host("node1"), tier.topology.host("node2")];
        tier.lbs[index]
            .process
            .signal(nix::sys::signal::Signal::SIGKILL);
        tier.lbs[index].process.wait(Duration::from_secs(5));
        let options = HaproxyOptions {
            agent_check,
            ..HaproxyOptions::default()
        };
        tier.lbs[index] = Haproxy::start(host, &haproxy_config_with(host, &nodes, &options));
    }
    for (lb, name) in tier.lbs.iter().zip(["lb1", "lb2"]) {
        wait_until(
            Duration::from_secs(10),
            &format!("the agent's MAINT back on {name}"),
            || lb.status("node1").starts_with("MAINT"),
        );
    }
    let log = tier.agents[0].log();
    assert!(log.contains("re-applied it"), "{log}");
    assert_eq!(tier.agents[0].backend("api")["state"], "drained");

    // The same HAProxy process showing the server back in rotation is somebody's hand: lb2
    // (runtime API only) keeps what the operator set, and the agent reports it.
    std::thread::sleep(Duration::from_secs(2));
    tier.lbs[1].command("set server api/node1 state ready");
    wait_until(
        Duration::from_secs(5),
        "the hand-set ready reported",
        || drift(&tier.agents[0]).contains("somebody put it back by hand"),
    );
    assert!(
        !tier.lbs[1].status("node1").starts_with("MAINT"),
        "the agent overwrote an operator's ready on the same HAProxy process"
    );
}

/// Agent checks every 500 ms, no runtime API in the agents' configs.
fn agent_check_only_tier(extra_backend: &str) -> agent_check_only::Tier {
    agent_check_only::tier(extra_backend, "500ms", 3)
}

#[test]
fn an_agent_check_only_load_balancer_restarted_learns_the_agents_maint_again() {
    let mut tier = agent_check_only_tier("");
    let drained = tier.agents[0].cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    // `maint` goes out on the next poll after the drain.
    wait_until(Duration::from_secs(3), "MAINT through agent-check", || {
        tier.lb.status("node1").starts_with("MAINT")
    });
    let host = tier.topology.host("lb1");
    let nodes = [tier.topology.host("node1"), tier.topology.host("node2")];
    tier.lb.process.signal(nix::sys::signal::Signal::SIGKILL);
    tier.lb.process.wait(Duration::from_secs(5));
    tier.lb = Haproxy::start(
        host,
        &haproxy_config_with(host, &nodes, &HaproxyOptions::default()),
    );
    wait_until(
        Duration::from_secs(5),
        "the agent's MAINT back through agent-check",
        || tier.lb.status("node1").starts_with("MAINT"),
    );
    // And an operator's MAINT on node2, whose agent is at rest, stands.
    tier.lb.command("disable server api/node2");
    std::thread::sleep(Duration::from_secs(2));
    assert!(tier.lb.status("node2").starts_with("MAINT"));
}

#[test]
fn after_a_failed_cycle_and_a_torn_journal_agent_check_keeps_the_server_out_and_says_how_to_return_it()
 {
    let mut tier = agent_check_only_tier("restart = { command = [\"/bin/false\"] }");
    let failed = tier.agents[0].cli(&["cycle", "api", "--json"]);
    assert_eq!(failed.code, Some(5), "{failed:?}");
    wait_until(Duration::from_secs(3), "MAINT through agent-check", || {
        tier.lb.status("node1").starts_with("MAINT")
    });
    let journal = tier.topology.host("node1").dir.join("state/journal.json");
    assert!(journal.exists(), "no journal at {}", journal.display());
    std::fs::write(&journal, b"{\"version\": 1, \"backends\": {\"api\": {\"pha").unwrap();
    tier.agents[0].kill_and_restart();
    // Six polls later the load balancer still holds the server out.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        tier.lb.status("node1").starts_with("MAINT"),
        "the restarted agent put a failed server back: {}\n{}",
        tier.lb.status("node1"),
        tier.agents[0].log()
    );
    wait_until(Duration::from_secs(5), "status says why and how", || {
        let drift = drift(&tier.agents[0]);
        drift.contains("journal was unreadable") && drift.contains("drain-agent resume api")
    });
    let log = tier.agents[0].log();
    assert!(log.contains("the operation journal is torn"), "{log}");
    assert!(log.contains("tells them `ready`"), "{log}");

    let resumed = tier.agents[0].cli(&["resume", "api", "--json"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    wait_until(Duration::from_secs(10), "node1 back UP", || {
        tier.lb.status("node1") == "UP"
    });
}

#[test]
fn drain_then_ready_by_hand_then_cycle_proves_the_drain_again_and_the_request_completes() {
    // The runtime API only: an operator's `ready` by hand stands on the same HAProxy process.
    let options = HaproxyOptions {
        agent_check: false,
        ..HaproxyOptions::default()
    };
    let tier = tier_with_options("drain_timeout = \"30s\"", "", &options);
    let agent = &tier.agents[0];
    let drained = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    tier.assert_everywhere("node1", "MAINT");
    tier.lbs[0].command("set server api/node1 state ready");
    wait_until(Duration::from_secs(10), "node1 UP on lb1 by hand", || {
        tier.lbs[0].status("node1") == "UP"
    });
    let slow = tier.slow_request_to_node1(5000);
    wait_until(Duration::from_secs(3), "the slow request in flight", || {
        agent.count("api", "in_flight") == 1
    });
    let started = Instant::now();
    let cycle = agent.cli(&["cycle", "api", "--json"]);
    assert_eq!(cycle.code, Some(0), "{cycle:?}");
    assert_eq!(slow.join().unwrap(), 200, "the restart cut the request");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the cycle restarted under the request"
    );
    let report = cycle.json();
    assert!(
        report["at_drain_start"]["in_flight"].as_u64() >= Some(1),
        "the report does not name the request: {report}"
    );
    assert!(report["drain_evidence"].is_string(), "{report}");
    assert_eq!(report["outcome"], "ok", "{report}");
}

#[test]
fn resume_right_after_a_restart_cancels_the_reconciliation_and_the_node_stays_serving() {
    let mut tier = tier_with("drain_timeout = \"30s\"", "on_restart = \"finish\"");
    let slow = tier.slow_request_to_node1(4000);
    wait_until(Duration::from_secs(3), "the slow request in flight", || {
        tier.agents[0].count("api", "in_flight") == 1
    });
    let cycle = tier.agents[0].cli_in_background(&["cycle", "api"]);
    tier.agents[0].wait_backend("api", Duration::from_secs(10), "draining", |backend| {
        backend["state"] == "draining"
    });
    // lb1's runtime API goes silent (packets dropped): every command to it waits its timeout.
    let lb1 = tier.topology.host("lb1");
    let rules = lb1.dir.join("blackhole.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet blackhole {{\n chain input {{\n  type filter hook input priority 0;\n  \
             tcp dport {RUNTIME_API_PORT} drop\n }}\n}}\n"
        ),
    )
    .unwrap();
    let out = lb1
        .netns
        .command("nft")
        .arg("-f")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tier.agents[0].kill_and_restart();
    let _ = cycle.join();
    let resumed = tier.agents[0].cli(&["resume", "api", "--json"]);
    // Not refused: it cancels the reconciliation (the return's confirmation from lb1 may be
    // incomplete, its runtime API being silent).
    assert_ne!(
        resumed.code,
        Some(3),
        "resume after the restart: {resumed:?}\n{}",
        tier.agents[0].log()
    );
    wait_until(Duration::from_secs(15), "the node serving", || {
        tier.agents[0].backend("api")["state"] == "serving"
    });
    // It stays so: the reconciliation does not come back to finish the cycle.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            tier.agents[0].backend("api")["state"],
            "serving",
            "{}",
            tier.agents[0].log()
        );
    }
    wait_until(Duration::from_secs(10), "node1 UP on lb2", || {
        tier.lbs[1].status("node1") == "UP"
    });
    assert_eq!(slow.join().unwrap(), 200);
    assert!(
        tier.agents[0].log().contains("cancelled by `resume`"),
        "{}",
        tier.agents[0].log()
    );
}

#[test]
fn a_drained_backend_brought_back_by_the_journal_is_logged_with_since_when_by_what_and_how_to_return_it()
 {
    let mut tier = tier("");
    let drained = tier.agents[0].cli(&["drain", "api", "--wait", "--json"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    std::thread::sleep(Duration::from_secs(3));
    tier.agents[0].kill_and_restart();
    let backend = tier.agents[0].backend("api");
    assert_eq!(backend["state"], "drained");
    assert_eq!(backend["state_by"], "drain", "{backend}");
    let since = backend["state_since_unix_ms"].as_u64().expect("since");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        now - since >= 3000,
        "status counts from the agent's start, not the journal's time: {backend}"
    );
    let log = tier.agents[0].log();
    for words in [
        "the journal says this agent left the server out of rotation",
        "drain-agent resume api",
        "by=\"drain\"",
    ] {
        assert!(log.contains(words), "{words:?} missing in {log}");
    }
}

#[test]
fn a_second_agent_with_the_same_state_dir_is_refused_naming_the_first() {
    let lab = Lab::new();
    let first = lab.start_agent(&[("api", &[8774])], "", "ebpf");
    let state_dir = first.config.parent().unwrap().join("state");
    let dir = drain_agent_tests::TempDir::new("same-state-dir");
    let stderr = lab.refused_second_agent(dir.path(), "lo", &state_dir);
    let named = format!(
        "drain-agent pid {} (config {}) already uses state_dir {}",
        first.process.pid(),
        first.config.display(),
        state_dir.display()
    );
    assert!(stderr.contains(&named), "{named:?} missing in {stderr}");
    assert_eq!(first.backend("api")["state"], "serving");
}
