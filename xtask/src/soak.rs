//! `cargo xtask soak`: the nightly automation. N rolling upgrades of the demo tier under
//! constant load, with faults when asked (every kind at least once per run); a report, a
//! timeline picture and every host's logs under results/soak-STAMP/.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use drain_agent_tests::{
    TempDir,
    soak::{self, SoakOptions},
    tier::{ApiTier, TierOptions, host_names},
    topology::Topology,
};

/// What `cargo xtask soak` was asked for.
pub struct Args {
    pub rollouts: usize,
    pub faults: bool,
    pub seed: Option<u64>,
    pub nodes: usize,
    pub rate: u32,
    pub rollout_seconds: u64,
    pub window_seconds: u64,
}

/// Refuses what cannot run, before anything is set up (a usage error: exit 2). With faults,
/// every fault kind is dealt a cycle of its own on the first cycles, so the run needs at least
/// as many cycles (rollouts × nodes) as there are kinds.
pub fn check_args(args: &Args) -> Result<()> {
    if args.nodes < 2 || args.nodes > 20 {
        bail!("--nodes must be between 2 and 20 (a cycle needs another server UP: min_serving)");
    }
    if args.rollouts == 0 || args.rate == 0 || args.window_seconds == 0 {
        bail!("--rollouts, --rate and --window-seconds must be at least 1");
    }
    if let Err(problem) = soak::check_fault_cycles(args.rollouts, args.nodes, args.faults) {
        bail!("--faults: {problem}");
    }
    Ok(())
}

pub fn run(root: &Path, args: &Args) -> Result<()> {
    crate::demo::require_root()?;
    check_args(args)?;
    let seed = args.seed.unwrap_or_else(soak::fresh_seed);
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let results = root.join("results").join(format!("soak-{stamp}"));
    eprintln!(
        "soak: {} rollouts of {} nodes under {} req/s (a new connection per request, oha runs of \
         {} s back to back; each rollout lasts at least {} s){}; seed {seed} (replay with --seed \
         {seed})",
        args.rollouts,
        args.nodes,
        args.rate,
        args.window_seconds,
        args.rollout_seconds,
        if args.faults { ", faults on" } else { "" },
    );
    // An earlier soak that was interrupted (Ctrl-C skips the clean-up) leaves its
    // namespaces and processes behind under the same names: remove them first.
    let leftovers = drain_agent_tests::lab::down(&drain_agent_tests::lab::LabName {
        prefix: "dasoak".into(),
        dir: "/tmp/drain-agent-soak".into(),
    });
    if !leftovers.is_empty() {
        eprintln!(
            "soak: removed what an interrupted soak left: {}",
            leftovers.join(", ")
        );
    }
    let names = host_names(args.nodes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let topology = Topology::build(
        "dasoak-{}",
        TempDir::at("/tmp/drain-agent-soak".into()),
        &names,
    );
    let mut tier = ApiTier::start_with(
        topology,
        args.nodes,
        "1.0",
        &TierOptions {
            nopreempt: true,
            rollback: true,
            ..TierOptions::default()
        },
    );
    let report = soak::run(
        &mut tier,
        &SoakOptions {
            rollouts: args.rollouts,
            rate: args.rate,
            connections: 256,
            faults: args.faults,
            fault_probability: 0.5,
            seed,
            min_rollout: Duration::from_secs(args.rollout_seconds),
            window: Duration::from_secs(args.window_seconds),
            results: results.clone(),
        },
    );
    drop(tier);
    print!("{}", soak::summary(&report));
    println!(
        "\nreport: {}\ntimeline: {}\nlogs: {}",
        results.join("report.json").display(),
        results.join("timeline.svg").display(),
        results.join("hosts").display(),
    );
    if report["ok"] != true {
        bail!(
            "the soak failed: see the problems above and {}",
            results.display()
        );
    }
    Ok(())
}
