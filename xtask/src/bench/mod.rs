//! `cargo xtask bench`: every speed figure of docs/performance.md, measured in one run on real
//! kernel programs and real traffic in network namespaces, each printed beside a baseline
//! measured in the same run and the ratio of the two (the machine is shared and noisy: only
//! ratios from one run mean anything). `--json FILE` writes the same table.
//!
//! 1. Throughput: most requests/s through the node with the agent and without it (HAProxy
//!    answering a static response, oha keep-alive), alternating.
//! 2. Hot path: ns per packet of the TC programs against empty TC programs on the same
//!    interface, same packets, same window — watched port and unwatched port; the XDP gate
//!    against an empty XDP program on the same traffic in back-to-back windows, once the gate
//!    exists (`xdp_gate_cost`).
//! 3. Drain detection: from the kernel seeing the last response acknowledged to the drain
//!    declared, against the quiet period.
//! 4. Scale: 100,000 established tracked connections: `status` against reading
//!    /proc/net/tcp{,6} and `ss -tn` at the same moment; the agent's RSS and map memory.
//! 5. Churn: a million short connections; afterwards every gauge and the table are at 0.

mod churn;
mod program_cost;
mod scale;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::XdpMode;
use drain_agent_tests::{Agent, Lab, Process, http::Connection, load::oha_binary, wait_until};
use serde_json::{Value, json};

use program_cost::{Baseline, EMPTY_SKB_EGRESS, EMPTY_SKB_INGRESS, EMPTY_XDP, RunTimeStats, Runs};

/// The test API (gunicorn): its `/slow` endpoint holds a request for the detection figure.
const API: u16 = 8080;
/// HAProxy answering a static response: fast enough that the server is not what limits
/// throughput, on a watched port...
const FAST: u16 = 8081;
/// ...and on a port the agent does not watch (the one-lookup rejection).
const UNWATCHED: u16 = 9090;
/// The 100,000 held connections.
const SCALE: u16 = 9300;
/// A bare accept-answer-close server for the churn.
const CHURN: u16 = 9200;
const QUIET_MS: u64 = 50;
/// oha's connections for throughput and per-packet cost: enough to keep both cores busy.
const CLIENT_CONNECTIONS: u32 = 16;
/// Length of one throughput window; the ratio alternates `THROUGHPUT_PAIRS` pairs of them.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(3);
const THROUGHPUT_PAIRS: usize = 5;
/// Length of each per-packet cost window.
const COST_WINDOW: Duration = Duration::from_secs(5);
const DETECTION_ROUNDS: usize = 40;

/// One row of the table: a measured value, the baseline it is compared with (measured in the
/// same run), their ratio, and the goal.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the value is compared with, and its value in the same unit.
    pub baseline: Option<(String, f64)>,
    /// The goal, in words ("ratio ≤ 2.0").
    pub target: String,
    /// Whether the goal was met (`None`: no goal).
    pub met: Option<bool>,
}

impl Figure {
    /// `value / baseline`, or `baseline / value` for figures where less is better and the
    /// goal is "N× faster".
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, base)| self.value / base)
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline.as_ref().map(|(what, value)| json!({"what": what, "value": value})),
            "ratio": self.ratio(),
            "target": self.target,
            "met": self.met,
        })
    }

    fn print(&self) {
        let ratio = self.ratio().map(|r| format!("{r:.3}")).unwrap_or_default();
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "  {:<60} {:>10} {:<6} {:>9}  {} {verdict}",
            self.name,
            number(self.value),
            self.unit,
            ratio,
            self.target,
        );
        if let Some((what, value)) = &self.baseline {
            println!("      baseline: {} {} ({what})", number(*value), self.unit);
        }
    }
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

/// The parts of the bench, to run some of them only (`--only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Throughput,
    Cost,
    Detection,
    Scale,
    Churn,
}

pub fn run(json_path: Option<&Path>, only: &[Section]) -> Result<()> {
    crate::demo::require_root()?;
    let wanted = |section| only.is_empty() || only.contains(&section);
    let started = Instant::now();
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let _fast = fast_server(&lab)?;
    println!(
        "drain-agent benchmarks: {} CPUs, kernel {}, veth between two network namespaces\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        kernel_release()
    );
    let mut figures = Vec::new();

    // Throughput first: it starts and stops the agent, and leaves the last one running.
    let agent = if wanted(Section::Throughput) {
        let (agent, throughput) = throughput(&lab)?;
        figures.extend(throughput);
        agent
    } else {
        start_agent(&lab, Gate::With)
    };
    let agent = if wanted(Section::Cost) {
        figures.extend(packet_cost(&lab, &agent)?);
        let (agent, xdp) = xdp_gate_cost(&lab, agent)?;
        figures.extend(xdp);
        agent
    } else {
        agent
    };
    if wanted(Section::Detection) {
        figures.push(drain_detection(&lab, &agent)?);
    }
    if wanted(Section::Scale) {
        figures.extend(scale::status_at_scale(&lab, &agent, SCALE)?);
    }
    if wanted(Section::Churn) {
        figures.push(churn::run(&lab, &agent, CHURN)?);
    }

    println!(
        "\n  {:<60} {:>10} {:<6} {:>9}  target",
        "figure", "value", "unit", "ratio"
    );
    for figure in &figures {
        figure.print();
    }
    println!("\nwhole run: {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = json_path {
        let report = json!({
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "kernel": kernel_release(),
            "seconds": started.elapsed().as_secs_f64(),
            "figures": figures.iter().map(Figure::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_default()
}

/// TOML added to the `fast` backend (the throughput and per-packet cost traffic) when the agent
/// runs with a gate: open while the bench runs, it attaches the XDP program that
/// `xdp_gate_cost` measures on the same traffic.
const FAST_BACKEND_GATE: &str = "gate = { allow = [\"198.18.0.1/32\"] }";

/// Whether the agent's `fast` backend has a gate (opt-in per backend, docs/gate.md).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Without,
    With,
}

/// The agent as every figure sees it: the API, the fast server's watched port, the held
/// connections and the churn are backends; `UNWATCHED` is not.
fn start_agent(lab: &Lab, gate: Gate) -> Agent {
    let fast_extra = match gate {
        Gate::With => FAST_BACKEND_GATE,
        Gate::Without => "",
    };
    let socket = lab.dir.path().join("control.sock");
    let config = format!(
        "interfaces = [\"eth0\"]\n\
         control_socket = \"{}\"\n\
         quiet_period = \"{QUIET_MS}ms\"\n\
         # No load balancer polls in this lab: a short agent_check_interval keeps the wait for\n\
         # a first poller (docs/operations.md) short.\n\
         agent_check_listen = \"0.0.0.0:9500\"\n\
         agent_check_interval = \"10ms\"\n\
         [[backend]]\nname = \"api\"\nports = [{API}]\n\
         [[backend]]\nname = \"fast\"\nports = [{FAST}]\n{fast_extra}\n\
         [[backend]]\nname = \"scale\"\nports = [{SCALE}]\n\
         [[backend]]\nname = \"churn\"\nports = [{CHURN}]\n",
        socket.display()
    );
    drain_agent_tests::start_agent_with_config(&lab.node, lab.dir.path(), &config)
}

/// HAProxy answering every request itself with a static 200 (no backend server): the fastest
/// real HTTP server at hand, so the node's server is not what limits requests/s.
fn fast_server(lab: &Lab) -> Result<Process> {
    let config = format!(
        "global\n    nbthread 2\n\
         defaults\n    mode http\n    timeout client 60s\n    timeout server 60s\n    timeout connect 5s\n\
         frontend watched\n    bind :::{FAST} v4v6\n    http-request return status 200 content-type text/plain string ok\n\
         frontend unwatched\n    bind :::{UNWATCHED} v4v6\n    http-request return status 200 content-type text/plain string ok\n"
    );
    let path = lab.dir.path().join("fast-haproxy.cfg");
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(lab.dir.path().join("fast-haproxy.log"))?;
    let mut command = lab.node.command("haproxy");
    command
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(log.try_clone()?)
        .stderr(log);
    let process = Process::spawn("haproxy", &mut command);
    for port in [FAST, UNWATCHED] {
        let addr = Lab::node_addr(false, port);
        wait_until(Duration::from_secs(10), "the fast server to answer", || {
            lab.client.run(move || {
                Connection::connect(addr)
                    .and_then(|mut connection| connection.get("/"))
                    .is_ok_and(|response| response.status == 200)
            })
        });
    }
    Ok(process)
}

/// oha as fast as it goes (no rate limit, keep-alive) against `port` for `window`; returns
/// requests per second. Any failed request fails the bench.
fn oha_max(lab: &Lab, port: u16, window: Duration) -> Result<f64> {
    let output = lab.dir.path().join(format!("oha-max-{port}.json"));
    let out = lab
        .client
        .command(oha_binary())
        .args(["--no-tui", "--output-format", "json", "-o"])
        .arg(&output)
        .args(["-c", &CLIENT_CONNECTIONS.to_string()])
        .args(["-z", &format!("{}ms", window.as_millis())])
        .arg(format!("http://{}/", Lab::node_addr(false, port)))
        .output()
        .context("running oha")?;
    ensure!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&output)?)?;
    let errors: u64 = summary["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, count)| count.as_u64())
        .sum();
    // Requests cut off by the end of the window are not the server's failures.
    let errors = errors.saturating_sub(u64::from(CLIENT_CONNECTIONS));
    ensure!(
        errors == 0,
        "oha saw failed requests: {}",
        summary["errorDistribution"]
    );
    summary["summary"]["requestsPerSec"]
        .as_f64()
        .context("oha's summary has no requestsPerSec")
}

/// A count the environment may override (a shorter run), else `default`.
fn count_from_env(variable: &str, default: usize) -> usize {
    std::env::var(variable)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Requests/s without the agent (no agent process), with it (its programs attached, the port
/// watched), and with it and a gate on the port's backend, alternating windows so that drift in
/// the machine's load hits all three; the medians are compared. The gate is opt-in per backend
/// and on veth runs as generic XDP (the kernel prepares every skb for it, a cost the run-time
/// statistics do not see), so it is a row of its own. On a shared 2-core machine one window
/// differs from the next by more than the agent could cost, so the same windows also give a
/// figure that does not depend on the neighbours: the share of the CPUs the agent's kernel
/// programs used while the node served as fast as it could (BPF run-time statistics, on for
/// every window alike). The agent with the gate is left running for the figures after.
fn throughput(lab: &Lab) -> Result<(Agent, Vec<Figure>)> {
    let stats = RunTimeStats::enable()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let mut without = Vec::new();
    let mut with = [Vec::new(), Vec::new()];
    let mut shares = [Vec::new(), Vec::new()];
    let mut agent = None;
    for pair in 0..THROUGHPUT_PAIRS {
        drop(agent.take());
        without.push(oha_max(lab, FAST, THROUGHPUT_WINDOW)?);
        for (slot, gate) in [Gate::Without, Gate::With].into_iter().enumerate() {
            drop(agent.take());
            let started = start_agent(lab, gate);
            // The agent's own start (loading, seeding) is not what is measured.
            std::thread::sleep(Duration::from_millis(500));
            let ids = agent_program_ids(&started)?;
            let window = Instant::now();
            let mut rate = 0.0;
            let runs = program_cost::during(&stats, &ids, || {
                rate = oha_max(lab, FAST, THROUGHPUT_WINDOW)?;
                Ok(())
            })?;
            let busy: u64 = runs.iter().map(|runs| runs.nanoseconds).sum();
            shares[slot].push(busy as f64 / (window.elapsed().as_nanos() as f64 * cpus));
            with[slot].push(rate);
            agent = Some(started);
        }
        println!(
            "throughput window {}: without the agent {:.0} requests/s, with it {:.0} (its kernel \
             programs: {:.2} % of the CPUs), with it and a gate {:.0} ({:.2} %)",
            pair + 1,
            without[pair],
            with[0][pair],
            shares[0][pair] * 100.0,
            with[1][pair],
            shares[1][pair] * 100.0,
        );
    }
    drop(stats);
    let agent = agent.expect("at least one pair");
    let without = median(without);
    let [with, with_gate] = with.map(median);
    let [share, share_gate] = shares.map(median);
    let baseline = || Some(("without the agent, same server and client".into(), without));
    let figures = vec![
        Figure {
            name: "max requests/s through the node, with the agent".into(),
            value: with,
            unit: "req/s",
            baseline: baseline(),
            target: "ratio ≥ 0.98".into(),
            met: Some(with / without >= 0.98),
        },
        Figure {
            name: "CPU share of the agent's kernel programs then (both ends)".into(),
            value: share * 100.0,
            unit: "%",
            baseline: None,
            target: "≤ 2 % (what 0.98 allows)".into(),
            met: Some(share <= 0.02),
        },
        Figure {
            name: "max requests/s with the agent and a gate (generic XDP on veth)".into(),
            value: with_gate,
            unit: "req/s",
            baseline: baseline(),
            target: "reported (the gate is opt-in)".into(),
            met: None,
        },
        Figure {
            name: "CPU share of its kernel programs then".into(),
            value: share_gate * 100.0,
            unit: "%",
            baseline: None,
            target: "reported".into(),
            met: None,
        },
    ];
    Ok((agent, figures))
}

/// Every kernel program the agent attached (packet programs, sock_ops, the gate if any).
fn agent_program_ids(agent: &Agent) -> Result<Vec<u32>> {
    let status = agent.status();
    let mut ids: Vec<u32> = status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["program_id"].as_u64())
        .map(|id| id as u32)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ensure!(!ids.is_empty(), "no attachments in status: {status}");
    Ok(ids)
}

/// The agent's packet programs (`cgroup_skb`, both directions) against the bench's empty
/// ones, attached after them on the same cgroup (so both run on every packet), in the same
/// windows.
///
/// At the cgroup-v2 root they run on every socket of the machine, the bench's client (oha,
/// in the client namespace) included: every segment between client and node runs them once at
/// the sender's socket and once at the receiver's, so exactly half the runs are the node's.
/// To the unwatched port, every run is an unwatched one (the node's port is not a backend's,
/// nor is the client's). To the watched port, the client's half are the same unwatched runs,
/// so the node's watched runs cost `(total - half × unwatched cost per run) / half`. The
/// empty programs cost the same for every packet.
fn packet_cost(lab: &Lab, agent: &Agent) -> Result<Vec<Figure>> {
    let status = agent.status();
    let attachment = |direction: &str| -> Result<(u32, PathBuf)> {
        status["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["direction"] == direction && a["program_id"].as_u64().is_some())
            .map(|a| {
                (
                    a["program_id"].as_u64().unwrap_or_default() as u32,
                    PathBuf::from(a["interface"].as_str().unwrap_or_default()),
                )
            })
            .with_context(|| format!("no {direction} program in status: {status}"))
    };
    let (ingress, cgroup_root) = attachment("ingress")?;
    let (egress, _) = attachment("egress")?;
    let dir = lab.dir.path().to_path_buf();
    let baseline = lab.node.run(move || -> Result<Baseline> {
        let mut baseline = Baseline::load(&dir)?;
        baseline.attach_cgroup_skb(&cgroup_root)?;
        Ok(baseline)
    })?;
    let ids = [
        ingress,
        egress,
        baseline.id(EMPTY_SKB_INGRESS)?,
        baseline.id(EMPTY_SKB_EGRESS)?,
    ];
    let stats = RunTimeStats::enable()?;
    let mut windows = Vec::new();
    for port in [UNWATCHED, FAST] {
        let runs =
            program_cost::during(&stats, &ids, || oha_max(lab, port, COST_WINDOW).map(drop))?;
        let (drain, empty) = (runs[0].plus(runs[1]), runs[2].plus(runs[3]));
        ensure!(
            drain.count > 1000 && drain.count == empty.count,
            "the agent's and the empty programs must run on the same packets: {runs:?}"
        );
        windows.push((drain, empty));
    }
    drop(stats);
    drop(baseline);
    let [(unwatched, unwatched_empty), (watched, watched_empty)] = windows[..] else {
        bail!("two windows expected");
    };
    let node_runs = watched.count / 2;
    let node_watched = Runs {
        nanoseconds: (watched.nanoseconds as f64
            - unwatched.per_run_ns() * (watched.count - node_runs) as f64)
            .max(0.0) as u64,
        count: node_runs,
    };
    let node_empty = Runs {
        nanoseconds: (watched_empty.per_run_ns() * node_runs as f64) as u64,
        count: node_runs,
    };
    println!(
        "packet programs, unwatched port: {} runs, {:.1} ns vs {:.1} ns empty; watched port: {} \
         runs (half the node's), {:.1} ns vs {:.1} ns empty on average, the node's watched runs \
         {:.1} ns",
        unwatched.count,
        unwatched.per_run_ns(),
        unwatched_empty.per_run_ns(),
        watched.count,
        watched.per_run_ns(),
        watched_empty.per_run_ns(),
        node_watched.per_run_ns(),
    );
    Ok(vec![
        cost_figure(
            "packet programs' cost per packet, watched port (the node's socket)",
            node_watched,
            node_empty,
            "empty cgroup_skb program, same hook and packets",
            2.0,
        ),
        cost_figure(
            "packet programs' cost per packet, unwatched port",
            unwatched,
            unwatched_empty,
            "empty cgroup_skb program, same hook and packets",
            1.3,
        ),
    ])
}

fn cost_figure(name: &str, program: Runs, empty: Runs, baseline: &str, goal: f64) -> Figure {
    let (value, base) = (program.per_run_ns(), empty.per_run_ns());
    Figure {
        name: name.into(),
        value,
        unit: "ns",
        baseline: Some((baseline.into(), base)),
        target: format!("ratio ≤ {goal:.1}"),
        met: Some(value / base <= goal),
    }
}

/// XDP GATE ROW: the gate (issue 9) against the empty XDP program. It switches itself on when
/// `status` lists the gate's attachment on eth0 (`"direction": "gate"`, as the agent's
/// kernel/gate.rs names it), and attaches the empty program in the gate's own mode
/// (`"mode": "native"` or `"generic"`: on veth the gate takes generic).
///
/// An interface runs one XDP program (per mode), so the gate and the empty XDP program cannot
/// run side by side as the TC programs do. The row measures the same traffic (oha keep-alive
/// to the watched port: nearly every packet a non-SYN) in two back-to-back windows on the
/// node's eth0: the empty XDP program alone (the agent stopped, since its gate holds the
/// hook), then the agent started again with its gate.
fn xdp_gate_cost(lab: &Lab, agent: Agent) -> Result<(Agent, Vec<Figure>)> {
    let Some((_, mode)) = gate_attachment(&agent) else {
        println!("XDP gate cost: not measured (no XDP gate in the shipped object)");
        return Ok((agent, Vec::new()));
    };
    let stats = RunTimeStats::enable()?;
    drop(agent);
    let empty = empty_xdp_cost(lab, &stats, mode)?;
    let agent = start_agent(lab, Gate::With);
    let (gate, _) = gate_attachment(&agent).context("the restarted agent attached no gate")?;
    let [gate_runs] = program_cost::during(&stats, &[gate], || {
        oha_max(lab, FAST, COST_WINDOW).map(drop)
    })?[..] else {
        bail!("one program measured, one result expected");
    };
    println!(
        "XDP cost ({mode:?} mode): gate {:.1} ns/packet ({} packets), empty XDP program {:.1} \
         ns/packet ({} packets)",
        gate_runs.per_run_ns(),
        gate_runs.count,
        empty.per_run_ns(),
        empty.count
    );
    let figure = cost_figure(
        "XDP gate cost per packet (non-SYN traffic)",
        gate_runs,
        empty,
        "empty XDP program, same interface, mode and traffic, window before",
        1.3,
    );
    Ok((agent, vec![figure]))
}

/// The agent's XDP gate on eth0, from `status`: its program id and attach mode.
fn gate_attachment(agent: &Agent) -> Option<(u32, XdpMode)> {
    let status = agent.status();
    let gate = status["attachments"]
        .as_array()?
        .iter()
        .find(|a| a["interface"] == "eth0" && a["direction"] == "gate")?;
    let mode = match gate["mode"].as_str() {
        Some("native") => XdpMode::Driver,
        Some("generic") => XdpMode::Skb,
        _ => XdpMode::Default,
    };
    Some((gate["program_id"].as_u64()? as u32, mode))
}

/// The empty XDP program alone on the node's eth0 for one window of the cost traffic.
fn empty_xdp_cost(lab: &Lab, stats: &RunTimeStats, mode: XdpMode) -> Result<Runs> {
    let dir = lab.dir.path().to_path_buf();
    let baseline = lab.node.run(move || -> Result<Baseline> {
        let mut baseline = Baseline::load(&dir)?;
        baseline.attach_xdp("eth0", mode)?;
        Ok(baseline)
    })?;
    let runs = program_cost::during(stats, &[baseline.id(EMPTY_XDP)?], || {
        oha_max(lab, FAST, COST_WINDOW).map(drop)
    })?;
    Ok(runs[0])
}

/// From the kernel's idle moment (the client's ACK of the last response byte, seen at
/// ingress) to the drain declared, as the agent's own report states both: the detection lag
/// an operator waits beyond the quiet period. The drain is asked over the control socket
/// directly, so the CLI's start-up is not in it.
fn drain_detection(lab: &Lab, agent: &Agent) -> Result<Figure> {
    let addr = Lab::node_addr(false, API);
    let mut lags = Vec::new();
    let mut client_seen = Vec::new();
    for _ in 0..DETECTION_ROUNDS {
        let mut connection = lab.connect(addr);
        // Longer than the wait for a first agent-check poller (a few intervals plus 500 ms), so
        // that the drain ends on the kernel's evidence, not on that wait.
        connection.send("/slow?ms=700")?;
        wait_until(Duration::from_secs(2), "the request in flight", || {
            agent.count("api", "in_flight") == 1
        });
        let socket = agent.socket.clone();
        let drain = std::thread::spawn(move || -> Result<(Instant, Value)> {
            let report = drain_over_socket(&socket, "api")?;
            Ok((Instant::now(), report))
        });
        quick_ack(connection.stream());
        let response = connection.read_response()?;
        let answered = Instant::now();
        ensure!(response.status == 200, "slow request failed");
        let (drained, report) = drain.join().expect("drain thread")?;
        let (Some(zero), Some(done)) = (
            report["in_flight_zero_ms"].as_u64(),
            report["drained_ms"].as_u64(),
        ) else {
            bail!("the drain report lacks its timings: {report}");
        };
        lags.push(done.saturating_sub(zero) as f64);
        client_seen.push(drained.saturating_duration_since(answered).as_secs_f64() * 1000.0);
        ensure!(
            agent.cli(&["resume", "api"]).code == Some(0),
            "resume failed"
        );
    }
    lags.sort_by(f64::total_cmp);
    client_seen.sort_by(f64::total_cmp);
    let p99 = lags[(lags.len() * 99).div_ceil(100) - 1];
    println!(
        "drain detection ({DETECTION_ROUNDS} rounds): kernel idle → drained p50 {:.0} ms p99 {p99:.0} ms; \
         client read the response → drain answered p50 {:.1} ms max {:.1} ms (quiet_period {QUIET_MS} ms)",
        lags[lags.len() / 2],
        client_seen[client_seen.len() / 2],
        client_seen[client_seen.len() - 1],
    );
    Ok(Figure {
        name: "drain detection p99, last response acknowledged → drained".into(),
        value: p99,
        unit: "ms",
        baseline: Some(("quiet_period".into(), QUIET_MS as f64)),
        target: format!("≤ quiet_period + 5 ms ({} ms)", QUIET_MS + 5),
        met: Some(p99 <= (QUIET_MS + 5) as f64),
    })
}

/// The client acknowledges at once what it reads next (no delayed ACK), so that the kernel's
/// idle moment and the client's read are the same instant.
fn quick_ack(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// `drain BACKEND --wait` over the control socket; returns the final report.
fn drain_over_socket(socket: &Path, backend: &str) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let request = json!({"command": "drain", "backend": backend, "wait": true});
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut last = String::new();
    for line in BufReader::new(stream).lines() {
        last = line?;
    }
    let answer: Value = serde_json::from_str(&last).with_context(|| format!("answer {last:?}"))?;
    answer
        .get("report")
        .cloned()
        .with_context(|| format!("the drain did not end with a report: {answer}"))
}

/// `status` over the control socket, as the CLI sends it, without starting a process.
pub fn status_over_socket(socket: &Path) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(b"{\"command\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let answer: Value = serde_json::from_str(&line)?;
    answer
        .get("status")
        .cloned()
        .with_context(|| format!("not a status: {answer}"))
}
