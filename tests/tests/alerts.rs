//! The shipped Prometheus alert rules (deploy/prometheus/) pass promtool's checks and their
//! unit tests, and docs/metrics.md quotes them as shipped.

use std::{path::PathBuf, process::Command};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

/// Runs promtool; a missing promtool fails the test (it never skips).
fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "promtool cannot run ({err}): it is in Debian's `prometheus` package; \
                 `cargo xtask setup` installs it"
            )
        })
}

fn assert_success(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    assert_success(
        &promtool(&["check", "rules", "drain-agent.rules.yml"]),
        "promtool check rules",
    );
    // Among them: a cycle's first failure fires (its counter exists at 0 before it).
    assert_success(
        &promtool(&["test", "rules", "drain-agent.rules.test.yml"]),
        "promtool test rules",
    );
}

#[test]
fn docs_metrics_quotes_every_shipped_alert_rule_as_shipped() {
    let rules = std::fs::read_to_string(deploy().join("drain-agent.rules.yml")).unwrap();
    let docs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .unwrap();
    let mut alerts = 0;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert: ") {
            alerts += 1;
            assert!(docs.contains(name), "docs/metrics.md does not name {name}");
        }
        if let Some(expr) = line.strip_prefix("expr: ") {
            assert!(
                docs.contains(expr),
                "docs/metrics.md does not quote `{expr}` as shipped"
            );
        }
    }
    assert!(alerts >= 6, "{alerts} alerts in the rules file");
}
