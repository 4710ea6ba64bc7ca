//! `cargo xtask demo`: builds the tier in network namespaces, runs the rolling upgrade under
//! load with a VIP failover, prints the report and writes it with the timeline picture.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use drain_agent_tests::{
    TempDir,
    demo::{self, DemoOptions},
    tier::{ApiTier, host_names},
    topology::Topology,
};

pub fn require_root() -> Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo and the lab create network namespaces: run them as root");
    }
    Ok(())
}

pub fn run(
    root: &Path,
    nodes: usize,
    rate: u32,
    seconds: u64,
    handover: bool,
    baseline: bool,
) -> Result<()> {
    require_root()?;
    if nodes == 0 || nodes > 20 {
        bail!("--nodes must be between 1 and 20");
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let results = root.join("results").join(format!("demo-{stamp}"));
    eprintln!(
        "demo: starting 2 load balancers (HAProxy + keepalived, VIP), {nodes} API nodes \
         (gunicorn 1.0 + drain-agent) and a client (oha at {rate} req/s)"
    );
    let names = host_names(nodes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let topology = Topology::build(
        "dademo-{}",
        TempDir::at("/tmp/drain-agent-demo".into()),
        &names,
    );
    let tier = ApiTier::start(topology, nodes, "1.0");
    let operation = if handover { "handover" } else { "cycle" };
    // With the baseline: 1.0 → 1.1 without the agent, then 1.1 → 1.2 with it.
    let to_version = if baseline { "1.2" } else { "1.1" };
    eprintln!(
        "demo: tier up; upgrading every node to {to_version} with `drain-agent {operation}` under \
         load{}",
        if baseline {
            ", after the same upgrade to 1.1 without the agent"
        } else {
            ""
        }
    );
    let report = demo::run(
        &tier,
        &DemoOptions {
            rate,
            duration: Duration::from_secs(seconds),
            to_version: to_version.into(),
            failover: true,
            results: results.clone(),
            handover,
            baseline: baseline.then(|| "1.1".to_string()),
        },
    );
    drop(tier);
    print!("{}", demo::summary(&report));
    println!(
        "\nreport: {}\ntimeline: {}",
        results.join("report.json").display(),
        results.join("timeline.svg").display()
    );
    if report["ok"] != true {
        bail!("the demo did not meet its goal: see the report");
    }
    Ok(())
}
