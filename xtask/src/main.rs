//! `cargo xtask`: the one entry point for setting up a machine, building, running and testing.

mod bench;
mod demo;
mod fleet;
mod setup;
mod soak;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "drain-agent's build and test plumbing")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): Debian packages, the nightly's
    /// rust-src, bpf-linker built against LLVM 22.
    Setup,
    /// Build the release binary with the eBPF object embedded.
    Build,
    /// Build, then run the agent with the given arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job: a zero-downtime rolling upgrade of a 3-node API tier behind two HAProxy
    /// load balancers sharing a keepalived VIP, under load, with a failover halfway (root).
    Demo {
        /// API nodes to upgrade.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Requests per second against the VIP.
        #[arg(long, default_value_t = 350)]
        rate: u32,
        /// How long the load runs, in seconds (the upgrade must fit inside).
        #[arg(long, default_value_t = 70)]
        seconds: u64,
        /// Upgrade each node with `drain-agent handover` (the new version starts beside the
        /// old one; no node leaves the rotation) instead of `drain-agent cycle`.
        #[arg(long)]
        handover: bool,
        /// Skip the first run, the upgrade without the agent (restart node by node, HAProxy's
        /// health checks only), that the agent's run is compared with.
        #[arg(long)]
        no_baseline: bool,
    },
    /// The nightly soak: N rolling upgrades (versions alternating 1.1, 1.0, ...) of the demo
    /// tier under constant load through the VIP, faults with --faults (root). Writes
    /// results/soak-STAMP/ and fails if any request failed, any node did not end serving on the
    /// expected version, a fault kind never happened or an agent kill was not reconciled.
    Soak {
        /// Complete rolling upgrades to run.
        #[arg(long, default_value_t = 50)]
        rollouts: usize,
        /// Inject faults: agent SIGKILL mid-drain and mid-restart, HAProxy reload mid-drain,
        /// VIP failover mid-drain, a release that fails its health check. Every kind is dealt
        /// on the first cycles (one each, seeded order), later cycles get one with probability
        /// 1/2; needs at least 5 cycles (rollouts × nodes), else exit 2.
        #[arg(long)]
        faults: bool,
        /// Seed of the fault generator (printed by every run), to replay a run.
        #[arg(long)]
        seed: Option<u64>,
        /// API nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Requests per second against the VIP (a new connection each).
        #[arg(long, default_value_t = 700)]
        rate: u32,
        /// Each rollout lasts at least this long, in seconds (the load runs throughout).
        #[arg(long, default_value_t = 30)]
        rollout_seconds: u64,
        /// Length of one oha run, in seconds; runs follow each other back to back.
        #[arg(long, default_value_t = 10)]
        window_seconds: u64,
    },
    /// Build the Debian package (target/debian/drain-agent_VERSION_ARCH.deb): the binary, the
    /// systemd unit, an example config and the docs.
    Package,
    /// The demo's tier with sshd on every API node: the Ansible role installs the agents and
    /// rolling-upgrade.yml upgrades the nodes over SSH under load (root). Writes
    /// results/fleet-STAMP/.
    Fleet {
        /// API nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Requests per second against the VIP.
        #[arg(long, default_value_t = 350)]
        rate: u32,
        /// Give this node (e.g. node2) a new version that fails its health check: the play
        /// must stop there, leave later nodes untouched, and exit non-zero.
        #[arg(long = "break", value_name = "NODE")]
        break_node: Option<String>,
        /// API nodes as network namespaces of this host (no systemd; the agent unpacked under
        /// a prefix) instead of containers that boot systemd and install the package with apt.
        #[arg(long)]
        namespace_nodes: bool,
    },
    /// Measure every speed figure of docs/performance.md, each beside a baseline from the same
    /// run (root): throughput with and without the agent, the kernel programs' cost per packet
    /// against empty programs, drain detection, status and memory at 100,000 connections, churn.
    Bench {
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Run only these parts (comma-separated); all of them by default.
        #[arg(long, value_delimiter = ',', value_name = "PART")]
        only: Vec<bench::Section>,
    },
    /// The kernel matrix: boot Debian's kernels (6.1, 6.12) under QEMU and run the smoke suite
    /// in each, then on the running kernel (root). Prints a table kernel × check; fails unless
    /// every kernel passes (docs/troubleshooting.md#kernels).
    Kernels {
        /// Also write the matrix as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Keep the demo's environment running to explore it: `lab up`, `lab status`, `lab down`.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Lint (fmt, clippy on both sides) and run the whole suite: unit and privileged tests.
    Test {
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Start the tier (two load balancers, API nodes, a client) and leave it running.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Show the VIP holder and every node's agent status.
    Status,
    /// Remove everything the lab created (also after a crash).
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build(&root).map(drop)
        }
        Task::Run { args } => {
            setup::ensure()?;
            let binary = build(&root)?;
            let status = Command::new(&binary)
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", binary.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Demo {
            nodes,
            rate,
            seconds,
            handover,
            no_baseline,
        } => {
            setup::ensure()?;
            build(&root)?;
            demo::run(&root, nodes, rate, seconds, handover, !no_baseline)
        }
        Task::Soak {
            rollouts,
            faults,
            seed,
            nodes,
            rate,
            rollout_seconds,
            window_seconds,
        } => {
            let args = soak::Args {
                rollouts,
                faults,
                seed,
                nodes,
                rate,
                rollout_seconds,
                window_seconds,
            };
            if let Err(err) = soak::check_args(&args) {
                eprintln!("error: {err:#}");
                std::process::exit(2);
            }
            setup::ensure()?;
            build(&root)?;
            soak::run(&root, &args)
        }
        Task::Package => {
            setup::ensure()?;
            let binary = build(&root)?;
            fleet::package(&root, &binary)
        }
        Task::Fleet {
            nodes,
            rate,
            break_node,
            namespace_nodes,
        } => {
            if let Err(err) = fleet::check_args(nodes, break_node.as_deref()) {
                eprintln!("error: {err:#}");
                std::process::exit(2);
            }
            setup::ensure()?;
            build(&root)?;
            let kind = if namespace_nodes {
                drain_agent_tests::fleet::NodeKind::Namespaces
            } else {
                drain_agent_tests::fleet::NodeKind::Booted
            };
            fleet::run(&root, nodes, rate, break_node, kind)
        }
        Task::Bench { json, only } => {
            setup::ensure()?;
            build(&root)?;
            bench::run(json.as_deref(), &only)
        }
        Task::Kernels { json } => {
            setup::ensure()?;
            let binary = build(&root)?;
            let smoke = build_smoke(&root)?;
            let rows = drain_agent_tests::kernels::run_matrix(&root, &binary, &smoke);
            print!("{}", drain_agent_tests::kernels::table(&rows));
            if let Some(path) = json {
                drain_agent_tests::kernels::write_json(&path, &rows)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if !rows.iter().all(drain_agent_tests::kernels::Row::passed) {
                bail!("the kernel matrix failed");
            }
            Ok(())
        }
        Task::Lab { action } => {
            let lab = drain_agent_tests::lab::LabName::default_lab();
            match action {
                LabAction::Up { nodes } => {
                    setup::ensure()?;
                    build(&root)?;
                    demo::require_root()?;
                    print!("{}", drain_agent_tests::lab::up(&lab, nodes));
                }
                LabAction::Status => print!("{}", drain_agent_tests::lab::status(&lab)),
                LabAction::Down => {
                    demo::require_root()?;
                    let removed = drain_agent_tests::lab::down(&lab);
                    if removed.is_empty() {
                        println!("nothing to remove");
                    }
                    for item in removed {
                        println!("removed {item}");
                    }
                }
            }
            Ok(())
        }
        Task::Test { args } => {
            setup::ensure()?;
            test(&root, &args)
        }
    }
}

/// `cargo build --release -p drain-agent`; returns the binary's path.
fn build(root: &Path) -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "drain-agent"])?;
    Ok(root.join("target/release/drain-agent"))
}

/// The kernel matrix's smoke suite; returns the binary's path.
fn build_smoke(root: &Path) -> Result<PathBuf> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "drain-agent-tests",
        "--bin",
        "kernel-smoke",
    ])?;
    Ok(root.join("target/release/kernel-smoke"))
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    cargo(&["fmt", "--all", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "--deny",
        "warnings",
    ])?;
    // The eBPF crate only builds for the BPF target, with the nightly toolchain.
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--release",
        "--package",
        "drain-agent-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "--deny",
        "warnings",
    ]))?;
    let binary = build(root)?;
    let mut command = Command::new("cargo");
    command
        .args(["test", "--release", "--no-fail-fast", "--"])
        .args(args)
        .env("DRAIN_AGENT_BIN", &binary)
        .stdout(Stdio::piped());
    let mut child = command.spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().expect("piped stdout");
    // Echo the runner's output and add up its per-binary "test result" lines, so the run
    // ends on one total for the whole suite.
    let mut totals = [0u64; 3];
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            for (total, word) in totals.iter_mut().zip(["passed", "failed", "ignored"]) {
                *total += count_before(counts, word);
            }
        }
    }
    let status = child.wait()?;
    let [passed, failed, ignored] = totals;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("the test suite failed");
    }
    Ok(())
}

/// In "ok. 17 passed; 0 failed; ...", the number before `word`.
fn count_before(counts: &str, word: &str) -> u64 {
    counts
        .split(';')
        .find_map(|part| {
            let mut words = part.split_whitespace().rev();
            (words.next() == Some(word)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args))
}

/// Runs a command with inherited output; fails naming it when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
