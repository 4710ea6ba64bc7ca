//! `/metrics` as Prometheus and promtool read it, against a real tier (two HAProxy load
//! balancers, gunicorn nodes, agents with their kernel programs): the format each scraper
//! gets, and every way an operation ends counted with its outcome.

use std::{process::Command, time::Duration};

use drain_agent_tests::{
    CliOutcome,
    two_lbs::{Tier, tier_with},
    wait_until,
};

const METRICS: &str = "127.0.0.1:9477";

/// The tier with metrics on each node; a drain that outlives 2 s is forced.
fn tier() -> Tier {
    tier_with(
        "drain_timeout = \"2s\"\non_timeout = \"force\"",
        &format!("metrics_listen = \"{METRICS}\""),
    )
}

/// `curl` in node1's namespace, with curl's defaults plus `headers`: (content type, body).
fn scrape(tier: &Tier, headers: &[&str]) -> (String, String) {
    let mut command = tier.node("node1").netns.command("curl");
    command.args(["-sS", "--fail", "-o", "-", "-w", "\\n%{content_type}"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, content_type) = text.rsplit_once('\n').unwrap();
    (content_type.to_string(), body.to_string())
}

/// The value of one sample line, e.g. `drain_agent_operations_total{backend="api",...}`.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in:\n{body}"))
}

fn operations(tier: &Tier, operation: &str, outcome: &str) -> f64 {
    let (_, body) = scrape(tier, &[]);
    sample(
        &body,
        &format!(
            "drain_agent_operations_total{{backend=\"api\",operation=\"{operation}\",outcome=\"{outcome}\"}}"
        ),
    )
}

fn promtool_check_metrics(body: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn assert_exit(outcome: &CliOutcome, code: i32) {
    assert_eq!(outcome.code, Some(code), "{outcome:?}");
}

#[test]
fn every_way_an_operation_ends_moves_operations_total_and_promtool_accepts_the_text() {
    let tier = tier();
    let agent = &tier.agents[0];

    // Every outcome exists at 0 before the first operation: a first failure is an increase.
    for outcome in [
        "ok",
        "refused",
        "cancelled",
        "forced",
        "failed",
        "rolled-back",
    ] {
        assert_eq!(operations(&tier, "drain", outcome), 0.0, "{outcome}");
        assert_eq!(operations(&tier, "cycle", outcome), 0.0, "{outcome}");
    }

    // A drain without --wait is counted when it ends in the agent, not by its client.
    assert_exit(&agent.cli(&["drain", "api"]), 0);
    agent.wait_backend("api", Duration::from_secs(20), "drained", |backend| {
        backend["state"] == "drained"
    });
    wait_until(Duration::from_secs(5), "the drain counted", || {
        operations(&tier, "drain", "ok") == 1.0
    });

    // A refusal, with --json: one JSON object saying so, counted.
    let refused = agent.cli(&["drain", "api", "--json"]);
    assert_exit(&refused, 3);
    let answer = refused.json();
    assert_eq!(answer["outcome"], "refused", "{answer}");
    assert_eq!(answer["exit_code"], 3, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("is drained"),
        "{answer}"
    );
    assert_eq!(operations(&tier, "drain", "refused"), 1.0);
    assert_exit(&agent.cli(&["resume", "api"]), 0);
    assert_eq!(operations(&tier, "resume", "ok"), 1.0);

    // A drain cancelled by `resume` while a request is in flight: exit 9, counted.
    let slow = tier.slow_request_to_node1(1500);
    std::thread::sleep(Duration::from_millis(300));
    let drain = agent.cli_in_background(&["drain", "api", "--wait"]);
    agent.wait_backend("api", Duration::from_secs(10), "draining", |backend| {
        backend["state"] == "draining"
    });
    assert_exit(&agent.cli(&["resume", "api"]), 0);
    let cancelled = drain.join().unwrap();
    assert_exit(&cancelled, 9);
    assert!(cancelled.stdout.contains("cancelled"), "{cancelled:?}");
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(operations(&tier, "drain", "cancelled"), 1.0);

    // A drain forced at its 2 s deadline with a request in flight: `forced`, not `ok`, and
    // its deadline is not a drain duration.
    let (_, before) = scrape(&tier, &[]);
    let drained_before = sample(
        &before,
        "drain_agent_drain_duration_seconds_count{backend=\"api\"}",
    );
    let slow = tier.slow_request_to_node1(4000);
    std::thread::sleep(Duration::from_millis(300));
    let forced = agent.cli(&["drain", "api", "--wait", "--json"]);
    assert_exit(&forced, 0);
    assert_eq!(forced.json()["forced_with_in_flight"], 1, "{forced:?}");
    assert_eq!(operations(&tier, "drain", "forced"), 1.0);
    assert_eq!(operations(&tier, "drain", "ok"), 1.0);
    let (_, after) = scrape(&tier, &[]);
    assert_eq!(
        sample(
            &after,
            "drain_agent_drain_duration_seconds_count{backend=\"api\"}"
        ),
        drained_before
    );
    assert_eq!(
        sample(
            &after,
            "drain_agent_requests_in_flight_at_deadline_total{backend=\"api\"}"
        ),
        1.0
    );
    let _ = slow.join();
    assert_exit(&agent.cli(&["resume", "api"]), 0);

    // What curl gets (no Accept header) is Prometheus text that promtool accepts as is:
    // histograms, timestamps, process metrics and all.
    let (content_type, body) = scrape(&tier, &[]);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for family in [
        "# TYPE drain_agent_operations_total counter",
        "# TYPE drain_agent_phase_duration_seconds histogram",
        "drain_agent_build_info{version=",
        "drain_agent_kernel_mode{mode=\"ebpf\"} 1",
        "drain_agent_backend_phase_since_timestamp_seconds{backend=\"api\"}",
        "drain_agent_last_operation_end_timestamp_seconds{backend=\"api\"}",
        "process_cpu_seconds_total ",
        "process_open_fds ",
    ] {
        assert!(body.contains(family), "{family} missing in:\n{body}");
    }
    let checked = promtool_check_metrics(&body);
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A scraper that asks for OpenMetrics gets it.
    let (content_type, body) = scrape(&tier, &["Accept: application/openmetrics-text"]);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        body.contains("# TYPE drain_agent_operations counter"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
}
