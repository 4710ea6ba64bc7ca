//! `cargo xtask package` and `cargo xtask fleet`: the Debian package an operator installs, and
//! the Ansible role and rolling-upgrade playbook run over SSH against the demo's tier.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use drain_agent_tests::{
    TempDir,
    fleet::{self, FleetOptions, NodeKind},
    tier::host_names,
    topology::Topology,
};

/// Builds target/debian/drain-agent_VERSION_ARCH.deb from the release binary.
pub fn package(root: &Path, binary: &Path) -> Result<()> {
    let out = root.join("target/debian");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let deb = drain_agent_tests::package::build(binary, &out).context("build the package")?;
    println!("{}", deb.display());
    Ok(())
}

/// Checks the arguments before anything is built or started.
pub fn check_args(nodes: usize, break_node: Option<&str>) -> Result<()> {
    if !(2..=20).contains(&nodes) {
        bail!("--nodes must be between 2 and 20 (a rolling upgrade needs another node serving)");
    }
    if let Some(node) = break_node {
        let known: Vec<String> = (1..=nodes).map(|i| format!("node{i}")).collect();
        if !known.iter().any(|name| name == node) {
            bail!(
                "--break {node}: no such node; with --nodes {nodes} they are {}",
                known.join(", ")
            );
        }
    }
    Ok(())
}

pub fn run(
    root: &Path,
    nodes: usize,
    rate: u32,
    break_node: Option<String>,
    kind: NodeKind,
) -> Result<()> {
    crate::demo::require_root()?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let results = root.join("results").join(format!("fleet-{stamp}"));
    eprintln!(
        "fleet: starting 2 load balancers (HAProxy + keepalived, VIP), {nodes} API nodes \
         ({}gunicorn {} + sshd) and a client (ansible-playbook, oha at {rate} req/s)",
        match kind {
            NodeKind::Booted => "systemd-nspawn -b: systemd, ",
            NodeKind::Namespaces => "namespaces: ",
        },
        fleet::FROM_VERSION
    );
    let names = host_names(nodes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Everything of the run (keys, configs, the agents' prefixes) lives here and goes with it.
    let topology = Topology::build(
        "dafleet-{}",
        TempDir::at("/tmp/drain-agent-fleet".into()),
        &names,
    );
    let fleet = fleet::start(topology, nodes, kind);
    let report = fleet::run(
        &fleet,
        &FleetOptions {
            rate,
            to_version: "1.1".into(),
            break_node: break_node.clone(),
            results: results.clone(),
        },
    );
    drop(fleet);
    print!("{}", fleet::summary(&report));
    println!(
        "\nreport: {}\ntimeline: {}\nAnsible's output: {}",
        results.join("report.json").display(),
        results.join("timeline.svg").display(),
        results.join("ansible-rolling-upgrade.log").display(),
    );
    if report["ok"] != true {
        bail!("the fleet run did not meet its goal: see the report");
    }
    if let Some(node) = break_node {
        // The play stopped on the broken node, as it should; the run exits non-zero like the
        // play did, without an error of its own.
        eprintln!("fleet: the play stopped at {node} as it should (every check passed): exit 1");
        std::process::exit(1);
    }
    Ok(())
}
