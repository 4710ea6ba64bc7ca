//! The nightly soak: N complete rolling upgrades of the demo tier (`drain-agent cycle api` on
//! every node in turn, the version alternating 1.1, 1.0, 1.1, ...) under constant load through
//! the VIP, with faults injected at seeded random points (a run can be replayed):
//!
//! - the agent SIGKILLed mid-drain and started again at once (what `Restart=on-failure` does);
//! - the agent SIGKILLed mid-restart (the restart made to take 3 s), started again at once;
//! - a real HAProxy reload (`haproxy -sf OLDPID`) mid-drain on the load balancer that does not
//!   hold the VIP: its runtime state is lost and the agent applies it again;
//! - a VIP failover mid-drain (HAProxy stopped gracefully on the holder, as in the demo), with
//!   HAProxy started again on that load balancer at once; keepalived runs with `nopreempt`, so
//!   the VIP stays where it went;
//! - a release whose health check fails (version "broken-…"): the cycle rolls back to the
//!   previous version, and the rollout retries the node with the good release.
//!
//! Faults are dealt, not drawn by chance: with `faults`, the first cycles carry one fault each
//! from a shuffled deck of every kind, so that every kind happens in every run; later cycles
//! get one with `fault_probability`. A fault counts only once it really happened: one whose
//! phase the cycle did not show (or left before the fault's moment came) moves to the next
//! cycle, and one still undealt when the run ends is *missed* and fails the run. After every
//! agent kill the restarted agent must report that it reconciled the interrupted cycle (its
//! status and its log), or the run fails.
//!
//! The load is oha at a fixed rate, a new connection per request, in runs of a fixed length
//! started back to back (each run starts when the previous one's deadline passes). Each rollout
//! lasts at least `min_rollout` so that the run carries a known amount of load. `cargo xtask
//! soak` runs it; so does the soak test, shorter.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    CliOutcome, Process,
    demo::{self, Probe},
    load,
    tier::{ApiTier, VIP},
    topology::{BACKEND, FRONTEND_PORT, Haproxy},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub rollouts: usize,
    /// Requests per second against the VIP, a new connection each.
    pub rate: u32,
    /// Connections oha may have open at once.
    pub connections: u32,
    /// Inject faults: every kind once on the first cycles, then at random.
    pub faults: bool,
    /// Chance that a cycle after the dealt ones gets a fault (with `faults`).
    pub fault_probability: f64,
    pub seed: u64,
    /// Each rollout lasts at least this long (the load runs throughout).
    pub min_rollout: Duration,
    /// Length of one oha run; runs follow each other back to back.
    pub window: Duration,
    /// Where report.json, timeline.svg, the oha runs and the hosts' logs go.
    pub results: PathBuf,
}

/// The faults the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    AgentKillMidDrain,
    AgentKillMidRestart,
    HaproxyReloadMidDrain,
    VipFailoverMidDrain,
    BrokenRelease,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::AgentKillMidDrain,
        FaultKind::AgentKillMidRestart,
        FaultKind::HaproxyReloadMidDrain,
        FaultKind::VipFailoverMidDrain,
        FaultKind::BrokenRelease,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::AgentKillMidDrain => "agent_sigkill_mid_drain",
            FaultKind::AgentKillMidRestart => "agent_sigkill_mid_restart",
            FaultKind::HaproxyReloadMidDrain => "haproxy_reload_mid_drain",
            FaultKind::VipFailoverMidDrain => "vip_failover_mid_drain",
            FaultKind::BrokenRelease => "broken_release_rolled_back",
        }
    }
}

/// A small seeded generator (splitmix64): the same seed gives the same faults at the same
/// points of each cycle.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Rollouts a run with faults needs on `nodes` nodes: one cycle per fault kind at least
/// (every kind is dealt on the first cycles).
pub fn rollouts_needed_for_faults(nodes: usize) -> usize {
    FaultKind::ALL.len().div_ceil(nodes.max(1))
}

/// Why the options cannot give every fault kind a cycle, if they cannot.
pub fn check_fault_cycles(rollouts: usize, nodes: usize, faults: bool) -> Result<(), String> {
    let needed = rollouts_needed_for_faults(nodes);
    if faults && rollouts < needed {
        return Err(format!(
            "with faults, every one of the {} fault kinds is dealt a cycle of its own: {nodes} \
             nodes need at least {needed} rollouts (--rollouts {needed}), {rollouts} given",
            FaultKind::ALL.len()
        ));
    }
    Ok(())
}

/// A seed from the clock and the pid, for runs that do not give one.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ u64::from(std::process::id()) << 32).next_u64() % 1_000_000_000
}

/// Runs the soak on a tier started with `TierOptions { nopreempt: true, rollback: true }` and
/// returns the report (also written to `results` with the timeline and the hosts' logs).
pub fn run(tier: &mut ApiTier, options: &SoakOptions) -> Value {
    if let Err(problem) = check_fault_cycles(options.rollouts, tier.nodes.len(), options.faults) {
        panic!("{problem}");
    }
    std::fs::create_dir_all(&options.results).expect("create the results folder");
    widen_port_ranges(tier);
    let started = Instant::now();
    let url = format!("http://{VIP}:{FRONTEND_PORT}/mix");
    let watch = demo::Watch::start(
        tier,
        &url,
        options.results.join("load"),
        (options.rate, options.connections, options.window),
        started,
    );
    std::thread::sleep(Duration::from_secs(2));

    let mut rng = Rng::new(options.seed);
    let mut first = if options.faults {
        FaultKind::ALL.to_vec()
    } else {
        Vec::new()
    };
    shuffle(&mut first, &mut rng);
    let mut soak = Soak {
        tier,
        options,
        rng,
        pending: first
            .into_iter()
            .map(|kind| Pending {
                kind,
                tries: Vec::new(),
            })
            .collect(),
        deck: Vec::new(),
        not_reached: Vec::new(),
        started,
        retired: Vec::new(),
        rollouts: Vec::new(),
        faults: Vec::new(),
        failovers: Vec::new(),
        cycles: BTreeMap::new(),
        problems: Vec::new(),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| soak.rollouts()));
    if let Err(panic) = &outcome {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        soak.problems
            .push(format!("the soak stopped early: {message}"));
    }
    soak.report_missed();
    let final_versions: serde_json::Map<String, Value> = soak
        .tier
        .nodes
        .iter()
        .map(|node| (node.clone(), json!(demo::version_of(soak.tier, node))))
        .collect();

    let (windows, probes, samples) = watch.finish();
    soak.reap_retired();
    let windows = windows.unwrap_or_else(|_| {
        soak.problems
            .push("the load generator failed: see load/window-*/oha.log".into());
        Vec::new()
    });
    let report = soak.report(&url, &windows, &probes, final_versions);
    write_results(soak.tier, &options.results, &report, &samples, &probes);
    report
}

/// Per-request connections at several hundred a second need more local ports than the
/// default range, and TIME_WAIT ports reused (per network namespace).
fn widen_port_ranges(tier: &ApiTier) {
    for host in ["client", "lb1", "lb2"] {
        let netns = &tier.topology.host(host).netns;
        for setting in [
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ] {
            netns.sysctl(setting);
        }
    }
}

struct Soak<'a> {
    tier: &'a mut ApiTier,
    options: &'a SoakOptions,
    rng: Rng,
    /// Faults dealt and not yet injected, the next one first: every kind at the start, then
    /// one drawn by chance. A fault whose phase a cycle did not reach stays for the next.
    pending: std::collections::VecDeque<Pending>,
    /// Fault kinds still to draw after the first round (every kind once per round, in random
    /// order).
    deck: Vec<FaultKind>,
    /// Tries of a fault whose moment did not come (moved to the next cycle).
    not_reached: Vec<Value>,
    started: Instant,
    /// HAProxy processes replaced by a reload or after a failover, finishing their work.
    retired: Vec<Process>,
    rollouts: Vec<Value>,
    faults: Vec<Value>,
    failovers: Vec<Value>,
    /// Per node: every cycle started (for the timeline).
    cycles: BTreeMap<String, Vec<Value>>,
    problems: Vec<String>,
}

/// A fault dealt and not injected yet.
struct Pending {
    kind: FaultKind,
    /// Where it was tried and why its moment did not come.
    tries: Vec<Value>,
}

/// What became of a fault on its cycle.
enum Fault {
    /// It happened: its record.
    Injected(Value),
    /// Its moment did not come on this cycle: why (it moves to the next cycle).
    NotReached(String),
}

/// Fisher-Yates with the soak's generator.
fn shuffle(kinds: &mut [FaultKind], rng: &mut Rng) {
    for i in (1..kinds.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
}

/// How many times a rollout runs `cycle` on one node before it gives up on it.
const ATTEMPTS: usize = 4;

impl Soak<'_> {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn rollouts(&mut self) {
        for rollout in 0..self.options.rollouts {
            let target = if rollout % 2 == 0 { "1.1" } else { "1.0" };
            let rollout_started = Instant::now();
            let started_ms = self.ms();
            eprintln!(
                "soak: rollout {}/{} to {target}",
                rollout + 1,
                self.options.rollouts
            );
            let mut nodes = Vec::new();
            let mut all_serving = true;
            for index in 0..self.tier.nodes.len() {
                let fault = self.next_fault();
                let (node, not_reached) = self.upgrade_node(rollout, index, target, fault);
                if let Some(kind) = fault {
                    match not_reached {
                        None => {
                            self.pending.pop_front();
                        }
                        Some(why) => {
                            let tried = json!({
                                "kind": kind.name(),
                                "rollout": rollout + 1,
                                "node": self.tier.nodes[index],
                                "why": why,
                            });
                            self.not_reached.push(tried.clone());
                            if let Some(pending) = self.pending.front_mut() {
                                pending.tries.push(tried);
                            }
                        }
                    }
                }
                all_serving &= node["ended_serving"] == true;
                nodes.push(node);
                if !all_serving {
                    break;
                }
            }
            self.rollouts.push(json!({
                "rollout": rollout + 1,
                "target_version": target,
                "started_ms": started_ms,
                "duration_ms": rollout_started.elapsed().as_millis() as u64,
                "nodes": nodes,
            }));
            if !all_serving {
                self.problems.push(format!(
                    "rollout {} stopped: a node did not end serving on {target}",
                    rollout + 1
                ));
                return;
            }
            while rollout_started.elapsed() < self.options.min_rollout {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The fault the next cycle carries: the first one dealt and not injected yet (every kind
    /// at the start of the run); once none is left, one drawn with `fault_probability`.
    fn next_fault(&mut self) -> Option<FaultKind> {
        if !self.options.faults {
            return None;
        }
        if self.pending.is_empty() && self.rng.chance(self.options.fault_probability) {
            let kind = self.deal();
            self.pending.push_back(Pending {
                kind,
                tries: Vec::new(),
            });
        }
        self.pending.front().map(|pending| pending.kind)
    }

    fn deal(&mut self) -> FaultKind {
        if self.deck.is_empty() {
            self.deck = FaultKind::ALL.to_vec();
            shuffle(&mut self.deck, &mut self.rng);
        }
        self.deck.pop().expect("a full deck")
    }

    /// Every fault dealt and never injected is missed: a problem each, naming where it was
    /// last tried.
    fn report_missed(&mut self) {
        for pending in &self.pending {
            let problem = match pending.tries.last() {
                Some(last) => format!(
                    "fault {} missed: it was tried on {} cycle(s) and never happened; last in \
                     rollout {} on {}: {}",
                    pending.kind.name(),
                    pending.tries.len(),
                    last["rollout"],
                    last["node"].as_str().unwrap_or("?"),
                    last["why"].as_str().unwrap_or("?"),
                ),
                None => format!(
                    "fault {} missed: dealt, but no cycle was left to carry it (rollout {} of \
                     {} ended the run)",
                    pending.kind.name(),
                    self.rollouts.len(),
                    self.options.rollouts,
                ),
            };
            self.problems.push(problem);
        }
    }

    /// Cycles one node to `target` (retrying when a fault left it on the old version) and
    /// says how it ended; with a fault, also why the fault did not happen on this cycle if it
    /// did not (it then moves to the next cycle).
    fn upgrade_node(
        &mut self,
        rollout: usize,
        index: usize,
        target: &str,
        fault: Option<FaultKind>,
    ) -> (Value, Option<String>) {
        let name = self.tier.nodes[index].clone();
        let dir = self.tier.topology.host(&name).dir.clone();
        let release = match fault {
            Some(FaultKind::BrokenRelease) => format!("broken-{target}"),
            _ => target.to_string(),
        };
        std::fs::write(dir.join("version"), &release).unwrap();
        if fault == Some(FaultKind::AgentKillMidRestart) {
            std::fs::write(dir.join("restart-delay"), "3").unwrap();
        }
        let mut attempts = Vec::new();
        let mut fault_record = Value::Null;
        let mut not_reached = None;
        let mut ended_serving = false;
        let mut version = None;
        for attempt in 1..=ATTEMPTS {
            let with_fault = fault.filter(|_| attempt == 1);
            if matches!(
                with_fault,
                Some(FaultKind::VipFailoverMidDrain | FaultKind::HaproxyReloadMidDrain)
            ) {
                // Before the cycle starts, so that waiting does not eat the drain.
                self.wait_load_balancers_ready();
            }
            let log_from = std::fs::metadata(&self.tier.agents[index].log).map_or(0, |m| m.len());
            let cycle_started_ms = self.ms();
            let cycle = self.cycle_in_background(index);
            let mut injected = with_fault.map(|kind| self.inject(kind, index));
            let outcome = cycle.join().expect("the cycle thread");
            if fault == Some(FaultKind::BrokenRelease) {
                // The fixed release, for the retry.
                std::fs::write(dir.join("version"), target).unwrap();
            }
            let report: Value = serde_json::from_str(&outcome.stdout).unwrap_or(Value::Null);
            let mut reconciliation = Value::Null;
            if let Some(Fault::Injected(record)) = &injected {
                if record["agent_killed"] == true {
                    reconciliation = self.wait_reconciled(index, log_from);
                    if reconciliation["seen"] != true
                        && outcome.code != Some(8)
                        && !report["outcome"].is_null()
                    {
                        // The CLI had its report: the cycle ended before the kill landed, and
                        // the kill interrupted nothing.
                        injected = Some(Fault::NotReached(format!(
                            "the cycle had ended (exit {}, {}) before the kill landed: nothing \
                             was interrupted",
                            outcome.code.map_or_else(|| "?".into(), |c| c.to_string()),
                            report["outcome"].as_str().unwrap_or("?"),
                        )));
                    }
                }
            }
            let settled = self.settle(index);
            // Only now: after a kill the CLI returns while the restart is still under way.
            let _ = std::fs::remove_file(dir.join("restart-delay"));
            version = demo::version_of(self.tier, &name);
            ended_serving = settled["serving"] == true;
            let on_target = version.as_deref() == Some(target);
            let injection = match &injected {
                Some(Fault::Injected(record)) => record.clone(),
                Some(Fault::NotReached(why)) => json!({"not_reached": why}),
                None => Value::Null,
            };
            eprintln!(
                "soak:   {name}: cycle exit {} ({}){}{}",
                outcome
                    .code
                    .map_or_else(|| "signal".into(), |c| c.to_string()),
                report["outcome"].as_str().unwrap_or("no report"),
                match (with_fault, &injected) {
                    (Some(kind), Some(Fault::Injected(_))) => format!(
                        ", fault {}{}",
                        kind.name(),
                        match reconciliation["seen"].as_bool() {
                            Some(true) => ", reconciled",
                            Some(false) => ", NO reconciliation seen",
                            None => "",
                        }
                    ),
                    (Some(kind), Some(Fault::NotReached(why))) => format!(
                        ", fault {} not reached ({why}): it moves to the next cycle",
                        kind.name()
                    ),
                    _ => String::new(),
                },
                if ended_serving && on_target {
                    format!(", serving {target}")
                } else {
                    format!(
                        ", serving: {ended_serving}, version {}",
                        version.as_deref().unwrap_or("?")
                    )
                }
            );
            let attempt_record = json!({
                "attempt": attempt,
                "cycle_started_ms": cycle_started_ms,
                "exit_code": outcome.code,
                "outcome": report["outcome"],
                "message": report["message"].as_str().map(str::to_string)
                    .unwrap_or_else(|| outcome.stderr.trim().to_string()),
                "fault": injection,
                "reconciliation": reconciliation,
                "settled": settled,
                "version_after": version,
                "report": report,
            });
            self.cycles
                .entry(name.clone())
                .or_default()
                .push(json!({"cycle_started_ms": cycle_started_ms, "report": report}));
            match (with_fault, injected) {
                (Some(kind), Some(Fault::Injected(record))) => {
                    let killed = record["agent_killed"] == true;
                    fault_record = json!({
                        "kind": kind.name(),
                        "rollout": rollout + 1,
                        "node": name,
                        "injection": record,
                        "exit_code": outcome.code,
                        "outcome": if killed {
                            reconciliation["outcome"].clone()
                        } else {
                            report["outcome"].clone()
                        },
                        "message": attempt_record["message"],
                        // Only an agent kill leaves something to reconcile.
                        "reconciled": if killed { json!(reconciliation["seen"] == true) } else { Value::Null },
                        "reconciliation": reconciliation,
                    });
                }
                (Some(_), Some(Fault::NotReached(why))) => not_reached = Some(why),
                _ => {}
            }
            attempts.push(attempt_record);
            if !ended_serving || on_target {
                break;
            }
        }
        let on_target = version.as_deref() == Some(target);
        if !fault_record.is_null() {
            fault_record["retries"] = json!(attempts.len() - 1);
            fault_record["ended_serving"] = json!(ended_serving);
            fault_record["version_after"] = json!(version);
            fault_record["expected_version"] = json!(target);
            fault_record["ended_serving_on_expected_version"] = json!(ended_serving && on_target);
            if fault_record["reconciled"] == false {
                self.problems.push(format!(
                    "rollout {}: {} on {name}: the restarted agent reported no reconciliation of \
                     the interrupted cycle ({}); see hosts/{name}/agent.log",
                    rollout + 1,
                    fault_record["kind"].as_str().unwrap_or("?"),
                    fault_record["reconciliation"]["message"]
                        .as_str()
                        .unwrap_or("?"),
                ));
            }
            self.faults.push(fault_record);
        }
        if !(ended_serving && on_target) {
            self.problems.push(format!(
                "rollout {}: {name} ended {} on version {} (expected serving on {target}); see \
                 hosts/{name}/agent.log",
                rollout + 1,
                if ended_serving {
                    "serving"
                } else {
                    "NOT serving"
                },
                version.as_deref().unwrap_or("unknown"),
            ));
        }
        let node = json!({
            "node": name,
            "fault": fault.filter(|_| not_reached.is_none()).map(FaultKind::name),
            "fault_not_reached": not_reached.as_ref().map(|why| json!({
                "kind": fault.map(FaultKind::name),
                "why": why,
            })),
            "attempts": attempts,
            "ended_serving": ended_serving && on_target,
            "version": version,
        });
        (node, not_reached)
    }

    /// `drain-agent cycle api --json` against a node's agent, on a thread.
    fn cycle_in_background(&self, index: usize) -> std::thread::JoinHandle<CliOutcome> {
        self.tier.agents[index].cli_in_background(&["cycle", BACKEND, "--json"])
    }

    /// The backend's phase in the agent's status (`None` while it does not answer).
    fn phase(&self, index: usize) -> Option<String> {
        let status = self.tier.agents[index].try_status()?;
        status["backends"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == BACKEND)?["state"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits (at most `within`) for the phase; false if the cycle went past it unseen.
    fn wait_phase(&self, index: usize, phase: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.phase(index).as_deref() == Some(phase) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Watches the phase for `delay`; true if the backend is still in it at the end (the last
    /// look is the last thing before the fault), false as soon as it left.
    fn still_in_phase_after(&self, index: usize, phase: &str, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            if self.phase(index).as_deref() != Some(phase) {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
        }
    }

    /// Injects a fault into the cycle running on node `index`: what was done, or why its
    /// moment did not come on this cycle.
    fn inject(&mut self, kind: FaultKind, index: usize) -> Fault {
        let (phase, max_delay_ms) = match kind {
            FaultKind::BrokenRelease => {
                return Fault::Injected(
                    json!({"at_ms": self.ms(), "what": "the new release answers 503 on /healthz"}),
                );
            }
            FaultKind::AgentKillMidRestart => ("restarting", 2000),
            FaultKind::AgentKillMidDrain => ("draining", 800),
            FaultKind::HaproxyReloadMidDrain | FaultKind::VipFailoverMidDrain => ("draining", 500),
        };
        if !self.wait_phase(index, phase, Duration::from_secs(15)) {
            return Fault::NotReached(format!("the cycle did not show `{phase}` within 15 s"));
        }
        let delay = self.rng.below(max_delay_ms);
        if !self.still_in_phase_after(index, phase, Duration::from_millis(delay)) {
            return Fault::NotReached(format!(
                "the cycle left `{phase}` before the fault's moment, {delay} ms into it"
            ));
        }
        let at_ms = self.ms();
        let mut record =
            json!({"at_ms": at_ms, "phase_at_injection": phase, "delay_in_phase_ms": delay});
        match kind {
            FaultKind::AgentKillMidDrain | FaultKind::AgentKillMidRestart => {
                self.tier.agents[index].kill_and_restart();
                record["agent_killed"] = json!(true);
                record["agent_answering_after_ms"] = json!(self.ms() - at_ms);
            }
            FaultKind::HaproxyReloadMidDrain => {
                let holder = self.tier.vip_holder();
                let lb = if holder.as_deref() == Some("lb1") {
                    "lb2"
                } else {
                    "lb1"
                };
                self.start_haproxy_again(lb, true);
                record["load_balancer"] = json!(lb);
                record["vip_holder"] = json!(holder);
                record["new_haproxy_ready_after_ms"] = json!(self.ms() - at_ms);
            }
            FaultKind::VipFailoverMidDrain => {
                let failover = demo::fail_over(self.tier, self.started);
                let stopped = failover["haproxy_stopped_on"]
                    .as_str()
                    .unwrap_or("lb1")
                    .to_string();
                // HAProxy back on that load balancer once the stopping one has finished what
                // it owes: side by side they would share the monitor port, one answering
                // "stopping", and keepalived there would flap between FAULT and BACKUP. With
                // nopreempt the VIP stays where keepalived moved it.
                let index = if stopped == "lb1" { 0 } else { 1 };
                self.tier.lbs[index].process.wait(Duration::from_secs(60));
                self.start_haproxy_again(&stopped, false);
                let mut failover = failover;
                failover["haproxy_started_again_at_ms"] = json!(self.ms());
                record["failover"] = failover.clone();
                self.failovers.push(failover);
            }
            FaultKind::BrokenRelease => unreachable!(),
        }
        Fault::Injected(record)
    }

    /// Starts a new HAProxy on `lb` with the same config, taking over from the running one
    /// (`-sf OLDPID`: a reload) or beside one that is already stopping; waits until the new
    /// process answers its runtime API.
    fn start_haproxy_again(&mut self, lb: &str, reload: bool) {
        let index = if lb == "lb1" { 0 } else { 1 };
        let host = self.tier.topology.host(lb);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.dir.join("haproxy.log"))
            .unwrap();
        let mut command = host.netns.command("haproxy");
        command
            .args(["-db", "-f"])
            .arg(host.dir.join("haproxy.cfg"));
        if reload {
            command.args(["-sf", &self.tier.lbs[index].process.pid().to_string()]);
        }
        command.stdout(log.try_clone().unwrap()).stderr(log);
        let process = Process::spawn("haproxy", &mut command);
        let pid = format!("Pid: {}", process.pid());
        let new = Haproxy {
            process,
            socket: host.dir.join("admin.sock"),
        };
        crate::wait_until(
            Duration::from_secs(10),
            &format!("the new HAProxy on {lb} to answer its runtime API"),
            || {
                new.try_command("show info")
                    .is_some_and(|info| info.lines().any(|line| line.trim() == pid))
            },
        );
        let old = std::mem::replace(&mut self.tier.lbs[index], new);
        self.retired.push(old.process);
    }

    /// A failover needs a backup that can take the VIP: waits (at most 60 s) until every
    /// replaced HAProxy has exited and keepalived on the load balancer without the VIP is in
    /// BACKUP (not FAULT, as while a reloaded HAProxy's old process still answers "stopping").
    fn wait_load_balancers_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            self.retired.retain_mut(|process| process.running());
            let backup = match self.tier.vip_holder().as_deref() {
                Some("lb1") => Some("lb2"),
                Some("lb2") => Some("lb1"),
                _ => None,
            };
            let ready = backup.is_some_and(|lb| {
                let log =
                    std::fs::read_to_string(self.tier.topology.host(lb).dir.join("keepalived.log"))
                        .unwrap_or_default();
                log.lines()
                    .rev()
                    .find(|line| line.contains("Entering") && line.contains("STATE"))
                    .is_some_and(|line| line.contains("BACKUP STATE"))
            });
            if self.retired.is_empty() && ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.problems.push(
            "a load balancer was not ready to take the VIP within 60 s before a fault".into(),
        );
    }

    /// After an agent kill: waits (at most 90 s) until the restarted agent has reported the
    /// reconciliation of the interrupted cycle — in its status (`last_operation` is a
    /// `reconcile`) and in its log (from `log_from`, the log's length before the cycle) — and
    /// returns what it said, `seen` true; `seen` false if it did not report one.
    fn wait_reconciled(&self, index: usize, log_from: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = self.agent_log_since(index, log_from);
            let started = log
                .iter()
                .find(|line| line.contains("in the middle of an operation: reconciling"));
            let status = self.tier.agents[index].try_status();
            if let Some(status) = &status {
                let backend = status["backends"]
                    .as_array()
                    .and_then(|b| b.iter().find(|b| b["name"] == BACKEND).cloned())
                    .unwrap_or(Value::Null);
                let last = &backend["last_operation"];
                if status["running"].is_null() && last["operation"] == "reconcile" {
                    if let Some(started) = started {
                        return json!({
                            "seen": true,
                            "interrupted_operation": log_field(started, "operation"),
                            "interrupted_phase": log_field(started, "phase"),
                            "outcome": last["outcome"],
                            "message": last["message"],
                            "state": backend["state"],
                            "log": log,
                        });
                    }
                }
                // Nothing reconciled and nothing under way a while after the start: the
                // journal held no interrupted operation.
                if status["running"].is_null()
                    && last.is_null()
                    && status["uptime_seconds"].as_f64().is_some_and(|s| s > 5.0)
                {
                    return json!({
                        "seen": false,
                        "outcome": null,
                        "message": "the restarted agent found nothing to reconcile",
                        "state": backend["state"],
                        "log": log,
                    });
                }
            }
            if Instant::now() > deadline {
                return json!({
                    "seen": false,
                    "outcome": null,
                    "message": format!(
                        "no reconciliation reported within 90 s (status: {}, log: {})",
                        if status.is_some() { "answering" } else { "not answering" },
                        if started.is_some() { "reconciling" } else { "no reconciliation" },
                    ),
                    "log": log,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's agent log lines about reconciliation written since `from` (bytes).
    fn agent_log_since(&self, index: usize, from: u64) -> Vec<String> {
        let bytes = std::fs::read(&self.tier.agents[index].log).unwrap_or_default();
        let new = bytes.get(from as usize..).unwrap_or_default();
        String::from_utf8_lossy(new)
            .lines()
            .filter(|line| {
                line.contains("reconcil")
                    || line.contains("the restart the previous")
                    || line.contains("interrupted restart")
            })
            .map(|line| line.trim().to_string())
            .collect()
    }

    /// Waits (at most 60 s) until the node is serving: the agent at rest in `serving`, and UP
    /// on both load balancers. Returns what it saw last.
    fn settle(&self, index: usize) -> Value {
        let name = &self.tier.nodes[index];
        let deadline = Instant::now() + Duration::from_secs(60);
        let waited = Instant::now();
        loop {
            let status = self.tier.agents[index].try_status();
            let phase = self.phase(index);
            let running = status.as_ref().map(|s| s["running"].clone());
            let lbs: Vec<Option<String>> = self
                .tier
                .lbs
                .iter()
                .map(|lb| server_status(lb, name))
                .collect();
            let serving = phase.as_deref() == Some("serving")
                && running == Some(Value::Null)
                && lbs.iter().all(|s| s.as_deref() == Some("UP"));
            if serving || Instant::now() > deadline {
                return json!({
                    "serving": serving,
                    "agent_phase": phase,
                    "lb1": lbs[0],
                    "lb2": lbs[1],
                    "waited_ms": waited.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the replaced HAProxy processes to finish (they should, after `grace` and
    /// their last answers); one that does not is a problem worth reporting.
    fn reap_retired(&mut self) {
        for mut process in self.retired.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while process.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if process.running() {
                self.problems.push(format!(
                    "a replaced HAProxy (pid {}) was still running 30 s after the soak",
                    process.pid()
                ));
            }
        }
    }

    fn report(
        &self,
        url: &str,
        windows: &[load::Window],
        probes: &[Probe],
        final_versions: serde_json::Map<String, Value>,
    ) -> Value {
        let load = load::windows_summary(windows);
        let (requests, failed, non_2xx) = (
            load["requests"].as_u64().unwrap_or(0),
            load["failed"].as_u64().unwrap_or(0),
            load["non_2xx"].as_u64().unwrap_or(0),
        );
        let probe_failed = probes.iter().filter(|p| p.status != Some(200)).count();

        let mut by_kind: BTreeMap<&str, Value> = BTreeMap::new();
        let mut never_injected = Vec::new();
        for kind in FaultKind::ALL {
            let events: Vec<&Value> = self
                .faults
                .iter()
                .filter(|f| f["kind"] == kind.name())
                .collect();
            let mut exit_codes: BTreeMap<String, u64> = BTreeMap::new();
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            for event in &events {
                *exit_codes
                    .entry(event["exit_code"].to_string())
                    .or_default() += 1;
                *outcomes
                    .entry(event["outcome"].as_str().unwrap_or("none").to_string())
                    .or_default() += 1;
            }
            let count = |key: &str| {
                events
                    .iter()
                    .filter(|e| e[key] == true || e[key].as_u64().is_some_and(|n| n > 0))
                    .count()
            };
            let missed = self.pending.iter().filter(|p| p.kind == kind).count();
            let not_reached = self
                .not_reached
                .iter()
                .filter(|t| t["kind"] == kind.name())
                .count();
            if self.options.faults && events.is_empty() && missed == 0 {
                never_injected.push(kind.name());
            }
            let kills = events.iter().filter(|e| !e["reconciled"].is_null()).count();
            by_kind.insert(
                kind.name(),
                json!({
                    "injected": events.len(),
                    "not_reached": not_reached,
                    "missed": missed,
                    "reconciled": (kills > 0).then(|| events.iter().filter(|e| e["reconciled"] == true).count()),
                    "cycle_exit_codes": exit_codes,
                    "outcomes": outcomes,
                    "retried": count("retries"),
                    "ended_serving_on_expected_version": count("ended_serving_on_expected_version"),
                }),
            );
        }

        let completed = self.rollouts.len();
        let all_nodes_ok = self.rollouts.iter().all(|r| {
            r["nodes"]
                .as_array()
                .is_some_and(|nodes| nodes.iter().all(|n| n["ended_serving"] == true))
        });
        let last_target = self
            .rollouts
            .last()
            .and_then(|r| r["target_version"].as_str())
            .unwrap_or("1.0");
        let final_ok = final_versions
            .values()
            .all(|v| v.as_str() == Some(last_target));
        let unreconciled = self
            .faults
            .iter()
            .filter(|f| f["reconciled"] == false)
            .count();
        let mut problems = self.problems.clone();
        problems.extend(
            never_injected
                .iter()
                .map(|kind| format!("fault {kind} was never injected")),
        );
        let ok = problems.is_empty()
            && self.pending.is_empty()
            && never_injected.is_empty()
            && unreconciled == 0
            && completed == self.options.rollouts
            && all_nodes_ok
            && final_ok
            && failed == 0
            && non_2xx == 0
            // A scheduled request never sent (every connection stuck) counts as lost.
            && load["not_sent"] == 0
            && probe_failed == 0
            && requests > 0;
        let nodes: Vec<Value> = self
            .tier
            .nodes
            .iter()
            .map(|name| {
                let faults: Vec<Value> = self
                    .faults
                    .iter()
                    .filter(|f| f["node"] == name.as_str())
                    .map(|f| json!({"at_ms": f["injection"]["at_ms"], "kind": f["kind"]}))
                    .collect();
                json!({
                    "name": name,
                    "cycles": self.cycles.get(name).cloned().unwrap_or_default(),
                    "faults": faults,
                })
            })
            .collect();
        json!({
            "ok": ok,
            "title": format!(
                "Soak: {completed} rolling upgrades{}",
                if self.options.faults { " with faults" } else { "" }
            ),
            "seed": self.options.seed,
            "faults_enabled": self.options.faults,
            "rollouts_planned": self.options.rollouts,
            "rollouts_completed": completed,
            "nodes_count": self.tier.nodes.len(),
            "duration_ms": self.ms(),
            "settings": {
                "rate_per_second": self.options.rate,
                "connections": self.options.connections,
                "load_window_seconds": self.options.window.as_secs(),
                "min_rollout_seconds": self.options.min_rollout.as_secs(),
                // Every kind dealt once on the first cycles, then this chance per cycle.
            "faults_dealt_first": if self.options.faults { FaultKind::ALL.len() } else { 0 },
            "fault_probability_per_cycle": if self.options.faults { self.options.fault_probability } else { 0.0 },
                "url": url,
                "new_connection_per_request": true,
            },
            "load": load,
            "probe": {"requests": probes.len(), "failed": probe_failed},
            "faults": by_kind,
            "fault_events": self.faults,
            "faults_not_reached": self.not_reached,
            "failovers": self.failovers,
            "rollouts": self.rollouts,
            "final_versions": final_versions,
            "problems": problems,
            "nodes": nodes,
        })
    }
}

/// A field of a plain tracing line (`name=value` or `name="value"`).
fn log_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"')?],
        None => rest.split_whitespace().next()?,
    };
    Some(value.to_string())
}

/// A server's status on one load balancer's runtime API; `None` while it does not answer.
fn server_status(lb: &Haproxy, server: &str) -> Option<String> {
    let out = lb.try_command("show stat -1 4 -1")?;
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let column = header.iter().position(|name| *name == "status")?;
    lines
        .map(|line| line.split(',').collect::<Vec<_>>())
        .find(|row| row.first() == Some(&BACKEND) && row.get(1) == Some(&server))
        .and_then(|row| row.get(column).map(|value| value.to_string()))
}

/// report.json, timeline.svg, and every host's logs and configs under hosts/.
fn write_results(
    tier: &ApiTier,
    results: &Path,
    report: &Value,
    samples: &[demo::LbSample],
    probes: &[Probe],
) {
    std::fs::write(
        results.join("report.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .expect("write report.json");
    std::fs::write(
        results.join("timeline.svg"),
        crate::timeline::render(
            report,
            &demo::samples_json(samples),
            &demo::probes_json(probes),
        ),
    )
    .expect("write timeline.svg");
    for host in &tier.topology.hosts {
        let target = results.join("hosts").join(&host.name);
        let _ = std::fs::create_dir_all(&target);
        for entry in std::fs::read_dir(&host.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let keep = path.extension().is_some_and(|ext| {
                ["log", "cfg", "conf", "toml"].contains(&ext.to_str().unwrap_or(""))
            }) || path
                .file_name()
                .is_some_and(|n| n.to_str().is_some_and(|n| n.ends_with("version")));
            if keep && path.is_file() {
                let _ = std::fs::copy(&path, target.join(entry.file_name()));
            }
        }
        let journal = host.dir.join("state/journal.json");
        if journal.exists() {
            let _ = std::fs::copy(&journal, target.join("journal.json"));
        }
    }
}

/// The summary printed at the end.
pub fn summary(report: &Value) -> String {
    let load = &report["load"];
    let mut out = format!(
        "\nsoak: {} of {} rollouts on {} nodes in {:.0} s, seed {} (replay: --seed {}){}\n",
        report["rollouts_completed"],
        report["rollouts_planned"],
        report["nodes_count"],
        report["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        report["seed"],
        report["seed"],
        if report["faults_enabled"] == true {
            ", faults on"
        } else {
            ""
        },
    );
    out.push_str(&format!(
        "requests {}  failed {}  non-2xx {}  probe failures {}  latency p50 {:.1} ms, worst p99 {:.0} ms\n",
        load["requests"],
        load["failed"],
        load["non_2xx"],
        report["probe"]["failed"],
        load["latency_p50_ms_median_of_windows"]
            .as_f64()
            .unwrap_or(0.0),
        load["latency_p99_ms_worst_window"].as_f64().unwrap_or(0.0),
    ));
    if report["faults_enabled"] == true {
        out.push_str(&format!(
            "{:<28} {:>8} {:>11} {:>6} {:>10} {:>7}  {:<18} {:>23}\n",
            "fault",
            "injected",
            "not reached",
            "missed",
            "reconciled",
            "retried",
            "cycle exit codes",
            "ended serving on target"
        ));
        for (kind, entry) in report["faults"].as_object().into_iter().flatten() {
            let codes: Vec<String> = entry["cycle_exit_codes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(code, n)| format!("{code}×{n}"))
                .collect();
            out.push_str(&format!(
                "{kind:<28} {:>8} {:>11} {:>6} {:>10} {:>7}  {:<18} {:>23}\n",
                entry["injected"].to_string(),
                entry["not_reached"].to_string(),
                entry["missed"].to_string(),
                entry["reconciled"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), |n| n.to_string()),
                entry["retried"].to_string(),
                codes.join(" "),
                entry["ended_serving_on_expected_version"].to_string(),
            ));
        }
    }
    out.push_str(&format!("final versions: {}\n", report["final_versions"]));
    for problem in report["problems"].as_array().into_iter().flatten() {
        out.push_str(&format!("PROBLEM: {}\n", problem.as_str().unwrap_or("?")));
    }
    out.push_str(if report["ok"] == true {
        "soak: OK\n"
    } else {
        "soak: FAILED\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_with_faults_needs_a_cycle_per_kind() {
        assert_eq!(rollouts_needed_for_faults(3), 2);
        assert_eq!(rollouts_needed_for_faults(5), 1);
        assert_eq!(rollouts_needed_for_faults(2), 3);
        assert!(check_fault_cycles(2, 3, true).is_ok());
        assert!(check_fault_cycles(1, 3, false).is_ok());
        let refused = check_fault_cycles(1, 3, true).unwrap_err();
        assert!(refused.contains("at least 2 rollouts"), "{refused}");
    }

    #[test]
    fn the_first_round_deals_every_kind_once() {
        for seed in 0..50 {
            let mut kinds = FaultKind::ALL.to_vec();
            shuffle(&mut kinds, &mut Rng::new(seed));
            kinds.sort();
            assert_eq!(kinds, FaultKind::ALL.to_vec());
        }
    }

    #[test]
    fn fields_are_read_from_plain_log_lines() {
        let line = "2026-05-20T10:00:00.000000Z  WARN drain_agent::drain::reconcile: the previous \
                    agent stopped in the middle of an operation: reconciling backend=\"api\" \
                    operation=\"cycle\" phase=\"draining\" on_restart=\"restore\"";
        assert_eq!(log_field(line, "operation").as_deref(), Some("cycle"));
        assert_eq!(log_field(line, "phase").as_deref(), Some("draining"));
        assert_eq!(
            log_field("x phase=restarting y", "phase").as_deref(),
            Some("restarting")
        );
        assert_eq!(log_field(line, "missing"), None);
    }
}
