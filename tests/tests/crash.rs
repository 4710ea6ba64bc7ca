//! The agent's own crash and the load balancers' and service's faults: real HAProxy pairs,
//! real API nodes, oha counting every request, and the agent killed with SIGKILL and started
//! again the way systemd's `Restart=on-failure` does. After each fault the server must be
//! where `status` and the report say it is, and no request may fail.

use std::time::{Duration, Instant};

use drain_agent_tests::{
    load::{Connections, Load},
    topology::{
        API_PORT, FRONTEND_PORT, Haproxy, HaproxyOptions, haproxy_config_with, serve_api_script,
    },
    two_lbs::{Tier, tier},
    wait_until,
};

fn load_through_lb1(tier: &Tier, seconds: u64) -> Load {
    let client = tier.topology.host("client");
    let url = format!("http://{}:{FRONTEND_PORT}/", tier.topology.host("lb1").v4);
    Load::start(
        &client.netns,
        &client.dir,
        &url,
        200,
        Duration::from_secs(seconds),
        Connections::KeepAlive(16),
    )
}

/// Waits until every load balancer shows node1 UP; returns how long that took from `since`.
fn node1_back_everywhere(tier: &Tier, since: Instant, within: Duration) -> Duration {
    for lb in &tier.lbs {
        wait_until(within, "node1 UP on every load balancer", || {
            lb.status("node1") == "UP"
        });
    }
    since.elapsed()
}

#[test]
fn sigkill_mid_drain_then_a_restart_puts_the_server_back_and_cuts_nothing() {
    let mut tier = tier("drain_timeout = \"30s\"");
    let load = load_through_lb1(&tier, 15);
    let slow = tier.slow_request_to_node1(4000);
    wait_until(Duration::from_secs(3), "the slow request in flight", || {
        tier.agents[0].count("api", "in_flight") == 1
    });
    let cycle = tier.agents[0].cli_in_background(&["cycle", "api"]);
    wait_until(Duration::from_secs(5), "node1 draining", || {
        tier.agents[0].backend("api")["state"] == "draining"
    });
    tier.assert_everywhere("node1", "DRAIN");

    let started = tier.agents[0].kill_and_restart();
    let took = node1_back_everywhere(&tier, started, Duration::from_secs(10));
    eprintln!("node1 back in rotation {took:?} after the agent started again");
    assert_eq!(
        slow.join().unwrap(),
        200,
        "the request in flight at the kill"
    );

    let cli = cycle.join().unwrap();
    assert_eq!(cli.code, Some(8), "{cli:?}");
    assert!(
        cli.stderr
            .contains("the agent went away while cycle `api` was draining")
            && !cli.stderr.contains("Progress {"),
        "{}",
        cli.stderr
    );
    let backend = tier.agents[0].backend("api");
    assert_eq!(backend["state"], "serving", "{backend}");
    assert_eq!(
        backend["last_operation"]["operation"], "reconcile",
        "{backend}"
    );
    let log = tier.agents[0].log();
    assert!(
        log.contains("the previous agent stopped in the middle of an operation"),
        "{log}"
    );
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1000);
}

#[test]
fn sigkill_mid_restart_then_a_restart_completes_the_cycle() {
    let mut tier = tier("drain_timeout = \"30s\"");
    let node1 = tier.node("node1").dir.clone();
    std::fs::write(node1.join("restart-delay"), "3").unwrap();
    std::fs::write(node1.join("version"), "2.0").unwrap();
    let load = load_through_lb1(&tier, 15);
    std::thread::sleep(Duration::from_secs(1));
    let cycle = tier.agents[0].cli_in_background(&["cycle", "api"]);
    wait_until(Duration::from_secs(10), "node1 restarting", || {
        tier.agents[0].backend("api")["state"] == "restarting"
    });
    let started = tier.agents[0].kill_and_restart();
    let took = node1_back_everywhere(&tier, started, Duration::from_secs(10));
    eprintln!("node1 back in rotation {took:?} after the agent started again");
    assert_eq!(tier.version_of("node1"), "2.0", "the restart completed");
    // The load balancers show UP before the agent has its confirmations and the report.
    let backend = tier.agents[0].wait_backend(
        "api",
        Duration::from_secs(10),
        "the reconciliation's report",
        |backend| backend["last_operation"]["operation"] == "reconcile",
    );
    assert_eq!(backend["state"], "serving", "{backend}");
    let summary = &backend["last_operation"];
    assert_eq!(summary["operation"], "reconcile", "{backend}");
    assert_eq!(summary["outcome"], "ok", "{backend}");
    assert!(
        summary["message"]
            .as_str()
            .unwrap()
            .contains("the restart under way when the agent stopped completed"),
        "{summary}"
    );
    assert_eq!(cycle.join().unwrap().code, Some(8));
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1000);
}

/// Found by the soak: the old service still answered its health check while the interrupted
/// restart command was stopping it, and the restarted agent put the server back before the
/// restart had finished. The restart's process group is journaled and waited for.
#[test]
fn sigkill_while_the_restart_command_still_runs_waits_for_it_before_verifying() {
    let mut tier = tier("drain_timeout = \"30s\"");
    let node1 = tier.node("node1").dir.clone();
    // A restart that leaves the old service answering for 2 s before it replaces it.
    let slow = format!(
        "restart = {{ command = [\"sh\", \"-c\", \"sleep 2; exec {} restart {} {API_PORT}\"], timeout = \"60s\" }}",
        serve_api_script().display(),
        node1.display()
    );
    let config = std::fs::read_to_string(&tier.agents[0].config).unwrap();
    let config: Vec<String> = config
        .lines()
        .map(|line| {
            if line.starts_with("restart = ") {
                slow.clone()
            } else {
                line.to_string()
            }
        })
        .collect();
    std::fs::write(&tier.agents[0].config, config.join("\n")).unwrap();
    tier.agents[0].kill_and_restart();
    std::fs::write(node1.join("version"), "2.0").unwrap();
    let cycle = tier.agents[0].cli_in_background(&["cycle", "api"]);
    wait_until(Duration::from_secs(10), "node1 restarting", || {
        tier.agents[0].backend("api")["state"] == "restarting"
    });
    let started = tier.agents[0].kill_and_restart();
    node1_back_everywhere(&tier, started, Duration::from_secs(20));
    // Back in rotation only once the restart completed: the new version answers.
    assert_eq!(tier.version_of("node1"), "2.0", "{}", tier.agents[0].log());
    let backend = tier.agents[0].wait_backend(
        "api",
        Duration::from_secs(10),
        "the reconciliation's report",
        |backend| backend["last_operation"]["operation"] == "reconcile",
    );
    let log = tier.agents[0].log();
    assert_eq!(
        backend["last_operation"]["outcome"], "ok",
        "{backend}\n{log}"
    );
    assert!(
        log.contains("the restart the previous agent started is still running")
            && log.contains("the interrupted restart finished"),
        "{log}"
    );
    assert_eq!(cycle.join().unwrap().code, Some(8));
}

#[test]
fn a_finished_drain_survives_an_agent_restart_and_a_torn_journal_keeps_the_server_out() {
    let mut tier = tier("");
    let drained = tier.agents[0].cli(&["drain", "api", "--wait"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    tier.assert_everywhere("node1", "MAINT");

    // A crash does not put an operator's drained server back (agent-check keeps "maint").
    tier.agents[0].kill_and_restart();
    assert_eq!(tier.agents[0].backend("api")["state"], "drained");
    std::thread::sleep(Duration::from_secs(2)); // several agent checks
    tier.assert_everywhere("node1", "MAINT");

    // A torn journal: the agent starts, says what it found, and keeps what the load
    // balancers show.
    // The agent writes the journal only when something changes, so at rest the file can be
    // torn under it; the crash then leaves the torn file for the next start.
    let journal = tier.node("node1").dir.join("state/journal.json");
    std::fs::write(&journal, b"{\"version\": 1, \"backends\": {\"api\": {\"pha").unwrap();
    tier.agents[0].kill_and_restart();
    wait_until(
        Duration::from_secs(5),
        "the agent to adopt the LB state",
        || tier.agents[0].backend("api")["state"] == "drained",
    );
    let backend = tier.agents[0].backend("api");
    let reason = backend["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unreadable")
            && reason.contains("lb1 (MAINT")
            && reason.contains("drain-agent resume api"),
        "{backend}"
    );
    let log = tier.agents[0].log();
    assert!(log.contains("the operation journal is torn"), "{log}");
    tier.assert_everywhere("node1", "MAINT");
    let resumed = tier.agents[0].cli(&["resume", "api"]);
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    tier.assert_everywhere("node1", "UP");
}

#[test]
fn a_load_balancer_restarted_mid_drain_gets_the_state_applied_again() {
    let mut tier = tier("drain_timeout = \"30s\"");
    let slow = tier.slow_request_to_node1(5000);
    wait_until(Duration::from_secs(3), "the slow request in flight", || {
        tier.agents[0].count("api", "in_flight") == 1
    });
    let drain = tier.agents[0].cli_in_background(&["drain", "api", "--wait", "--json"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tier.lbs[1].status("node1").starts_with("DRAIN") {
        assert!(
            Instant::now() < deadline,
            "no DRAIN on lb2 ({}); agent: {}\n{}",
            tier.lbs[1].status("node1"),
            tier.agents[0].backend("api"),
            tier.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // HAProxy on lb2 dies and comes back without agent-check: its runtime state is gone, and
    // only the agent's drift check can put the drain back.
    let lb2 = tier.topology.host("lb2");
    let nodes = [tier.node("node1"), tier.node("node2")];
    let config = haproxy_config_with(
        lb2,
        &nodes,
        &HaproxyOptions {
            agent_check: false,
            ..HaproxyOptions::default()
        },
    );
    tier.lbs[1]
        .process
        .signal(nix::sys::signal::Signal::SIGKILL);
    tier.lbs[1].process.wait(Duration::from_secs(5));
    tier.lbs[1] = Haproxy::start(lb2, &config);
    wait_until(
        Duration::from_secs(5),
        "the drain re-applied on lb2",
        || tier.lbs[1].status("node1").starts_with("DRAIN"),
    );
    let log = tier.agents[0].log();
    assert!(log.contains("re-applied it"), "{log}");
    let outcome = drain.join().unwrap();
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(slow.join().unwrap(), 200);
    // lb2 came back without agent-check: its poller never confirms the return, and resume
    // says so (exit 7) although both runtime APIs show the server UP.
    let resumed = tier.agents[0].cli(&["resume", "api"]);
    let poller = format!("agent-check poller {}", lb2.v4);
    assert_eq!(resumed.code, Some(7), "{resumed:?}");
    assert!(resumed.stderr.contains(&poller), "{}", resumed.stderr);
    tier.assert_everywhere("node1", "UP");
}

#[test]
fn a_restart_that_hangs_is_stopped_at_its_timeout_and_rolled_back() {
    let tier = tier(
        "restart = { command = [\"sleep\", \"30\"], timeout = \"1s\" }\n\
         rollback = { command = [\"true\"] }",
    );
    let started = Instant::now();
    let outcome = tier.agents[0].cli(&["cycle", "api"]);
    assert_eq!(outcome.code, Some(6), "{outcome:?}");
    assert!(
        outcome.stderr.contains("did not finish within 1s")
            && outcome.stderr.contains("rolled back"),
        "{}",
        outcome.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(tier.agents[0].backend("api")["state"], "serving");
    tier.assert_everywhere("node1", "UP");
}

#[test]
fn a_rollback_that_fails_leaves_the_server_in_maint_and_says_where() {
    let tier = tier(
        "restart = { command = [\"sh\", \"-c\", \"echo no such release >&2; exit 3\"] }\n\
         rollback = { command = [\"sh\", \"-c\", \"echo rollback broken too >&2; exit 4\"] }",
    );
    let outcome = tier.agents[0].cli(&["cycle", "api", "--json"]);
    assert_eq!(outcome.code, Some(5), "{outcome:?}");
    let report = outcome.json();
    let message = report["message"].as_str().unwrap();
    assert!(
        message.contains("rollback failed")
            && message.contains("left in MAINT on lb1, lb2")
            && message.contains("drain-agent resume api"),
        "{message}"
    );
    assert_eq!(report["phase"], "failed");
    let backend = tier.agents[0].backend("api");
    assert_eq!(backend["state"], "failed", "{backend}");
    tier.assert_everywhere("node1", "MAINT");
    assert_eq!(tier.agents[0].cli(&["resume", "api"]).code, Some(0));
    tier.assert_everywhere("node1", "UP");
}

#[test]
fn a_load_balancer_down_for_the_whole_cycle_is_named_and_no_request_fails() {
    let mut tier = tier("drain_timeout = \"30s\"");
    tier.lbs[1]
        .process
        .signal(nix::sys::signal::Signal::SIGKILL);
    tier.lbs[1].process.wait(Duration::from_secs(5));
    std::fs::write(tier.node("node1").dir.join("version"), "2.0").unwrap();
    let load = load_through_lb1(&tier, 12);
    std::thread::sleep(Duration::from_secs(1));
    let outcome = tier.agents[0].cli(&["cycle", "api", "--json"]);
    // Back in service and confirmed by lb1, but lb2 never confirmed: exit 7 names it.
    assert_eq!(outcome.code, Some(7), "{outcome:?}");
    let report = outcome.json();
    let lb2 = report["load_balancers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|lb| lb["name"] == "lb2")
        .cloned()
        .unwrap_or_else(|| panic!("lb2 not in the report: {report}"));
    assert_eq!(lb2["reachable"], false, "{lb2}");
    assert!(lb2["ready_confirmed_ms"].is_null(), "{lb2}");
    assert!(
        report["message"].as_str().unwrap().contains("lb2"),
        "{report}"
    );
    assert_eq!(tier.lbs[0].status("node1"), "UP");
    assert_eq!(tier.version_of("node1"), "2.0");
    load.finish(Duration::from_secs(60))
        .assert_no_failures(1000);
}

#[test]
fn a_health_check_that_flaps_is_not_healthy_and_the_server_stays_out_in_words() {
    let tier = tier("");
    std::fs::write(tier.node("node1").dir.join("version"), "flapping").unwrap();
    let outcome = tier.agents[0].cli(&["cycle", "api", "--json"]);
    assert_eq!(outcome.code, Some(5), "{outcome:?}");
    let report = outcome.json();
    let message = report["message"].as_str().unwrap();
    assert!(
        message.contains("it flapped") && message.contains("left in MAINT on lb1, lb2"),
        "{message}"
    );
    let backend = tier.agents[0].backend("api");
    assert_eq!(backend["state"], "failed", "{backend}");
    assert!(
        backend["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("flapped"),
        "{backend}"
    );
    tier.assert_everywhere("node1", "MAINT");
}
