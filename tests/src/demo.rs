//! The main job, end to end: a rolling upgrade of every API node under constant load, with a
//! VIP failover halfway, measured from the client side. `cargo xtask demo` runs the full
//! version; the demo test a shorter one.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    http::Connection,
    load::{Connections, Load, Window},
    tier::{ApiTier, VIP},
    topology::FRONTEND_PORT,
    wait_until,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Requests per second the load generator sends to the VIP.
    pub rate: u32,
    /// How long the load runs; the upgrade must fit inside it.
    pub duration: Duration,
    /// Version the nodes are upgraded to.
    pub to_version: String,
    /// Stop HAProxy on the VIP holder halfway through.
    pub failover: bool,
    /// Where report.json and timeline.svg go.
    pub results: PathBuf,
    /// Upgrade with `drain-agent handover` (a new version beside the old, the node stays in
    /// rotation) instead of `drain-agent cycle`.
    pub handover: bool,
    /// First upgrade to this version the way it is done without the agent — restart node by
    /// node, HAProxy's health checks and retries only (the seed's procedure without a drain,
    /// what Kolla-Ansible does) — under the same load, then to `to_version` with the agent;
    /// the report's `baseline` holds the first run's figures. `None`: the agent run alone.
    pub baseline: Option<String>,
}

/// How a run upgrades a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// The service restarted in place (serve-api.sh restart: graceful), then the next node once
    /// it answers its health check locally; nothing tells the load balancers.
    Restart,
    Cycle,
    Handover,
}

impl Upgrade {
    fn name(self) -> &'static str {
        match self {
            Upgrade::Restart => "restart",
            Upgrade::Cycle => "cycle",
            Upgrade::Handover => "handover",
        }
    }
}

/// One client-side probe request (our own, to see versions over time).
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub(crate) at_ms: u64,
    pub(crate) status: Option<u16>,
    pub(crate) version: Option<String>,
}

/// One sample of the load balancers' counters.
#[derive(Debug, Clone)]
pub(crate) struct LbSample {
    at_ms: u64,
    /// Requests the frontends have received so far, summed over running load balancers.
    requests: u64,
    /// 5xx answers the frontends sent so far.
    errors_5xx: u64,
    vip_holder: Option<String>,
    /// API servers in rotation (UP) on the VIP holder; `None` when it could not be read.
    in_rotation: Option<u64>,
    /// Per load balancer, how much each of [`HIDDEN`]'s counters of the "api" backend grew
    /// since the run began (a restarted HAProxy's counters add on).
    hidden: Vec<[u64; HIDDEN.len()]>,
}

/// What a load balancer hides from the client (a retry, a redispatch to another server) or
/// loses, as HAProxy counts it per backend (`show stat` columns): report key, column.
pub(crate) const HIDDEN: [(&str, &str); 6] = [
    ("retries", "wretr"),
    ("redispatches", "wredis"),
    ("connection_errors", "econ"),
    ("response_errors", "eresp"),
    ("client_aborts", "cli_abrt"),
    ("server_aborts", "srv_abrt"),
];

/// Runs the demo on a started tier and returns the report (also written to the results
/// folder with the timeline picture): with a baseline, first the upgrade without the agent,
/// then with it, under the same load.
pub fn run(tier: &ApiTier, options: &DemoOptions) -> Value {
    std::fs::create_dir_all(&options.results).expect("create the results folder");
    let baseline = options.baseline.as_ref().map(|version| {
        eprintln!(
            "demo: first without the agent: every node restarted in turn to {version}, HAProxy's \
             health checks and retries only"
        );
        let dir = options.results.join("baseline");
        std::fs::create_dir_all(&dir).expect("create the baseline folder");
        let (figures, samples, probes) = upgrade(tier, options, Upgrade::Restart, version, false);
        write_report(&dir, &figures, &samples, &probes);
        figures
    });
    let how = if options.handover {
        Upgrade::Handover
    } else {
        Upgrade::Cycle
    };
    if baseline.is_some() {
        eprintln!(
            "demo: now with the agent: every node upgraded to {} with `drain-agent {}`",
            options.to_version,
            how.name()
        );
    }
    let (mut report, samples, probes) =
        upgrade(tier, options, how, &options.to_version, options.failover);
    report["baseline"] = baseline.unwrap_or(Value::Null);
    write_report(&options.results, &report, &samples, &probes);
    report
}

/// One rolling upgrade of every node to `version` under the demo's load, as `how` says; its
/// figures, and the samples and probes for its timeline.
fn upgrade(
    tier: &ApiTier,
    options: &DemoOptions,
    how: Upgrade,
    version: &str,
    failover_halfway: bool,
) -> (Value, Vec<LbSample>, Vec<Probe>) {
    let started = Instant::now();
    let client = tier.topology.host("client");
    let url = format!("http://{VIP}:{FRONTEND_PORT}/mix");
    let load_dir = client.dir.join(format!("load-{}", how.name()));
    std::fs::create_dir_all(&load_dir).expect("create the load folder");
    // New connection per request: what survives a VIP move (docs/operations.md, the demo).
    let load = Load::start(
        &client.netns,
        &load_dir,
        &url,
        options.rate,
        options.duration,
        Connections::PerRequest(128),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(Mutex::new(Vec::new()));
    let probe_thread = spawn_probe(client.netns.name(), started, stop.clone(), probes.clone());
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = spawn_sampler(tier, started, stop.clone(), samples.clone());

    std::thread::sleep(Duration::from_secs(3));
    let mut nodes = Vec::new();
    let mut failover = Value::Null;
    let halfway = tier.nodes.len() / 2;
    let mut all_ok = true;
    for (index, node) in tier.nodes.iter().enumerate() {
        if failover_halfway && index == halfway {
            failover = fail_over(tier, started);
        }
        std::fs::write(tier.topology.host(node).dir.join("version"), version).unwrap();
        let cycle_started_ms = started.elapsed().as_millis() as u64;
        if how == Upgrade::Restart {
            let (ok, entry) = restart_in_place(tier, node, cycle_started_ms, started);
            all_ok &= ok;
            nodes.push(entry);
            continue;
        }
        let outcome = tier.agents[index].cli(&[how.name(), "api", "--json"]);
        let report: Value = serde_json::from_str(&outcome.stdout)
            .unwrap_or_else(|_| json!({"outcome": "error", "message": outcome.stderr.trim()}));
        // Exit 7 says a load balancer did not confirm the return. When the only ones that did
        // not are the HAProxy this demo stopped for the failover, that is the expected answer.
        let stopped = failover["haproxy_stopped_on"].as_str().map(|name| {
            let address = tier.topology.host(name).v4.to_string();
            (name.to_string(), format!("agent-check poller {address}"))
        });
        let only_the_stopped_lb_unconfirmed = outcome.code == Some(7)
            && stopped.as_ref().is_some_and(|(name, poller)| {
                report["load_balancers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|lb| !lb["error"].is_null())
                    .all(|lb| lb["name"] == name.as_str() || lb["name"] == poller.as_str())
            });
        all_ok &= outcome.code == Some(0) || only_the_stopped_lb_unconfirmed;
        eprintln!(
            "demo: {node}: {} in {:.1}s ({})",
            report["outcome"].as_str().unwrap_or("?"),
            report["total_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            report["message"].as_str().unwrap_or("")
        );
        nodes.push(node_entry(
            node,
            Some(cycle_started_ms),
            json!(outcome.code),
            &report,
        ));
        if !all_ok {
            break;
        }
    }
    let mut final_versions = serde_json::Map::new();
    for node in &tier.nodes {
        final_versions.insert(node.clone(), json!(version_of(tier, node)));
    }

    let result = load.finish(options.duration + Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    probe_thread.join().expect("probe thread");
    sampler.join().expect("sampler thread");
    let probes = probes.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();

    let latency = &result.summary["latencyPercentiles"];
    let haproxy = hidden_by_load_balancers(&samples);
    let mut load = result.counts();
    for (key, value) in [
        ("url", json!(url)),
        ("rate_per_second", json!(options.rate)),
        ("requests", json!(result.total)),
        ("errors", result.summary["errorDistribution"].clone()),
        (
            "latency_p50_ms",
            json!(latency["p50"].as_f64().map(|s| s * 1000.0)),
        ),
        (
            "latency_p99_ms",
            json!(latency["p99"].as_f64().map(|s| s * 1000.0)),
        ),
    ] {
        load[key] = value;
    }
    // What the load balancers hid (retried, redispatched) or lost counts against the run as
    // much as what the client saw; a client that gave up (client_aborts) is not the node's.
    let nothing_hidden = HIDDEN
        .iter()
        .filter(|(key, _)| *key != "client_aborts")
        .all(|(key, _)| haproxy["total"][key] == 0);
    let report = json!({
        "operation": how.name(),
        "capacity": capacity(&samples, tier.nodes.len()),
        "ok": all_ok && result.errors == 0 && result.non_2xx == 0 && result.not_sent == 0
            && nothing_hidden
            && final_versions.values().all(|v| v.as_str() == Some(version)),
        "duration_ms": started.elapsed().as_millis() as u64,
        "load": load,
        "haproxy": haproxy,
        "nodes": nodes,
        "final_versions": final_versions,
        "failover": failover,
        "versions_seen": versions_seen(&probes),
        "probe": {
            "requests": probes.len(),
            "failed": probes.iter().filter(|p| p.status != Some(200)).count(),
        },
    });
    (report, samples, probes)
}

/// Restarts `node`'s service in place the way it is done without the agent (serve-api.sh
/// restart: the old version stops gracefully, the new one starts) and waits until it answers
/// its health check on the node itself, as a container's health check would; the load
/// balancers learn of it from their own health checks only. Returns whether it came back, and
/// the node's line.
fn restart_in_place(
    tier: &ApiTier,
    node: &str,
    started_ms: u64,
    started: Instant,
) -> (bool, Value) {
    let host = tier.topology.host(node);
    let status = host
        .netns
        .command(crate::topology::serve_api_script())
        .args([
            "restart",
            host.dir.to_str().unwrap(),
            &crate::topology::API_PORT.to_string(),
        ])
        .status();
    let restarted_ms = started.elapsed().as_millis() as u64;
    let addr = host.addr(crate::topology::API_PORT);
    let deadline = Instant::now() + Duration::from_secs(60);
    let healthy = loop {
        let answered = host.netns.run(move || {
            Connection::connect(addr)
                .and_then(|mut c| c.get("/healthz"))
                .is_ok_and(|r| r.status == 200)
        });
        if answered || Instant::now() >= deadline {
            break answered;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let healthy_ms = started.elapsed().as_millis() as u64;
    let ok = status.is_ok_and(|status| status.success()) && healthy;
    eprintln!(
        "demo: {node}: restarted in place in {:.1}s ({})",
        (healthy_ms - started_ms) as f64 / 1000.0,
        if ok { "healthy" } else { "NOT healthy" }
    );
    let report = json!({
        "outcome": if ok { "restarted" } else { "failed" },
        "restart_ms": restarted_ms - started_ms,
        "time_to_healthy_ms": healthy.then_some(healthy_ms - restarted_ms),
    });
    (
        ok,
        node_entry(
            node,
            Some(started_ms),
            json!(if ok { 0 } else { 1 }),
            &report,
        ),
    )
}

/// Writes report.json and the timeline picture (timeline.svg) into `results`.
pub(crate) fn write_report(results: &Path, report: &Value, samples: &[LbSample], probes: &[Probe]) {
    std::fs::write(
        results.join("report.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .expect("write report.json");
    std::fs::write(
        results.join("timeline.svg"),
        crate::timeline::render(report, &samples_json(samples), &probes_json(probes)),
    )
    .expect("write timeline.svg");
}

/// What runs beside a rolling upgrade until it is done: the load in back-to-back oha windows
/// through the VIP, our own version probe, and the load balancers' sampler.
pub(crate) struct Watch {
    stop: Arc<AtomicBool>,
    load: JoinHandle<Vec<Window>>,
    probe: JoinHandle<()>,
    sampler: JoinHandle<()>,
    probes: Arc<Mutex<Vec<Probe>>>,
    samples: Arc<Mutex<Vec<LbSample>>>,
}

/// What a [`Watch`] saw: the load's windows (`Err` if the load generator failed), the probes
/// and the samples.
pub(crate) type Watched = (std::thread::Result<Vec<Window>>, Vec<Probe>, Vec<LbSample>);

impl Watch {
    /// Starts them: `rate` requests per second to `url` from the client host, new connections
    /// each (at most `connections` at once), in oha runs of `window`; outputs under `dir`.
    pub(crate) fn start(
        tier: &ApiTier,
        url: &str,
        dir: PathBuf,
        (rate, connections, window): (u32, u32, Duration),
        started: Instant,
    ) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let client = tier.topology.host("client");
        let load = {
            let (netns, url, stop) = (
                client.netns.name().to_string(),
                url.to_string(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                crate::load::drive_windows(
                    &netns,
                    &dir,
                    &url,
                    rate,
                    connections,
                    window,
                    started,
                    &stop,
                )
            })
        };
        let probes = Arc::new(Mutex::new(Vec::new()));
        let probe = spawn_probe(client.netns.name(), started, stop.clone(), probes.clone());
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sampler = spawn_sampler(tier, started, stop.clone(), samples.clone());
        Watch {
            stop,
            load,
            probe,
            sampler,
            probes,
            samples,
        }
    }

    /// Stops them (the last oha window runs to its end) and returns what they saw.
    pub(crate) fn finish(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        let windows = self.load.join();
        self.probe.join().expect("probe thread");
        self.sampler.join().expect("sampler thread");
        let probes = self.probes.lock().unwrap().clone();
        let samples = self.samples.lock().unwrap().clone();
        (windows, probes, samples)
    }
}

/// A node's line in a rolling upgrade's report, from its cycle report (`drain-agent cycle
/// --json`): what the summary and the timeline read.
pub(crate) fn node_entry(
    name: &str,
    cycle_started_ms: Option<u64>,
    exit_code: Value,
    report: &Value,
) -> Value {
    json!({
        "name": name,
        "cycle_started_ms": cycle_started_ms,
        "exit_code": exit_code,
        "in_flight_at_drain_start": report["at_drain_start"]["in_flight"],
        "idle_at_drain_start": report["at_drain_start"]["idle"],
        "drain_ms": report["drained_ms"],
        "restart_ms": report["restart_ms"],
        "time_to_healthy_ms": report["time_to_healthy_ms"],
        "cut_in_flight": report["kernel"]["cut_in_flight"],
        "resets_by_node": report["kernel"]["resets_by_node"],
        "gate_refused": report["gate"]["refused"],
        "switched_ms": report["handover"]["switched_ms"],
        "old_exited_ms": report["handover"]["old_exited_ms"],
        "report": report,
    })
}

/// Gracefully stops HAProxy on the VIP holder (SIGUSR1: with `grace`, listeners stay open
/// until keepalived has moved the VIP) and waits for the VIP to move.
pub(crate) fn fail_over(tier: &ApiTier, started: Instant) -> Value {
    let holder = tier.vip_holder().unwrap_or_else(|| "lb1".into());
    let stopped_at_ms = started.elapsed().as_millis() as u64;
    tier.lb(&holder)
        .process
        .signal(nix::sys::signal::Signal::SIGUSR1);
    let mut moved_to = None;
    wait_until(
        Duration::from_secs(15),
        "keepalived to move the VIP",
        || {
            moved_to = tier.vip_holder().filter(|now| *now != holder);
            moved_to.is_some()
        },
    );
    let moved_at_ms = started.elapsed().as_millis() as u64;
    eprintln!(
        "demo: HAProxy on {holder} stopped at {:.1}s; the VIP moved to {} at {:.1}s",
        stopped_at_ms as f64 / 1000.0,
        moved_to.as_deref().unwrap_or("?"),
        moved_at_ms as f64 / 1000.0
    );
    json!({
        "haproxy_stopped_on": holder,
        "stopped_at_ms": stopped_at_ms,
        "vip_moved_to": moved_to,
        "vip_moved_at_ms": moved_at_ms,
    })
}

/// Our own client asking the VIP which version answers, 10 times a second.
pub(crate) fn spawn_probe(
    client: &str,
    started: Instant,
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
) -> JoinHandle<()> {
    let client = client.to_string();
    std::thread::spawn(move || {
        crate::enter_netns(&client);
        let vip = SocketAddr::new(VIP.into(), FRONTEND_PORT);
        while !stop.load(Ordering::Relaxed) {
            let at_ms = started.elapsed().as_millis() as u64;
            let response = Connection::connect(vip).and_then(|mut c| {
                c.send_closing("/")?;
                c.read_response()
            });
            probes.lock().unwrap().push(Probe {
                at_ms,
                status: response.as_ref().ok().map(|r| r.status),
                version: response.ok().and_then(|r| r.version),
            });
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Reads the load balancers' frontend counters and the VIP holder every 250 ms.
pub(crate) fn spawn_sampler(
    tier: &ApiTier,
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<LbSample>>>,
) -> JoinHandle<()> {
    let sockets: Vec<PathBuf> = tier.lbs.iter().map(|lb| lb.socket.clone()).collect();
    let lb_netns: Vec<String> = ["lb1", "lb2"]
        .iter()
        .map(|name| tier.topology.host(name).netns.name().to_string())
        .collect();
    std::thread::spawn(move || {
        // Counters of a load balancer that stopped stay at their last value; a restarted
        // HAProxy counts from 0 again, which adds to the total rather than lowering it.
        let grown = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        let mut last = vec![(0u64, 0u64); sockets.len()];
        let mut total = vec![(0u64, 0u64); sockets.len()];
        // The backend's counters from the run's first reading on: growth only.
        let mut hidden_last: Vec<Option<[u64; HIDDEN.len()]>> = vec![None; sockets.len()];
        let mut hidden = vec![[0u64; HIDDEN.len()]; sockets.len()];
        loop {
            // One last reading after the stop: what the run's last requests cost counts too.
            let stopping = stop.load(Ordering::Relaxed);
            let at_ms = started.elapsed().as_millis() as u64;
            for (index, socket) in sockets.iter().enumerate() {
                if let Some(now) = frontend_counters(socket) {
                    total[index].0 += grown(now.0, last[index].0);
                    total[index].1 += grown(now.1, last[index].1);
                    last[index] = now;
                }
                if let Some(now) = backend_counters(socket) {
                    if let Some(before) = hidden_last[index] {
                        for (sum, (now, before)) in
                            hidden[index].iter_mut().zip(now.iter().zip(before))
                        {
                            *sum += grown(*now, before);
                        }
                    }
                    hidden_last[index] = Some(now);
                }
            }
            let holder = lb_netns
                .iter()
                .zip(["lb1", "lb2"])
                .position(|(netns, _)| crate::tier::holds_vip(netns));
            let vip_holder = holder.map(|index| ["lb1", "lb2"][index].to_string());
            let in_rotation = holder.and_then(|index| servers_up(&sockets[index]));
            samples.lock().unwrap().push(LbSample {
                at_ms,
                requests: total.iter().map(|c| c.0).sum(),
                errors_5xx: total.iter().map(|c| c.1).sum(),
                vip_holder,
                in_rotation,
                hidden: hidden.clone(),
            });
            if stopping {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })
}

/// [`HIDDEN`]'s counters of the "api" backend, from the admin socket.
fn backend_counters(socket: &Path) -> Option<[u64; HIDDEN.len()]> {
    let (header, rows) = show_stat(socket, "-1 2 -1")?;
    let row = rows.iter().find(|row| row.starts_with("api,BACKEND"))?;
    let row: Vec<&str> = row.split(',').collect();
    let mut counters = [0u64; HIDDEN.len()];
    for (counter, (_, column)) in counters.iter_mut().zip(HIDDEN) {
        let at = header.iter().position(|h| h == column)?;
        // An empty field is a counter HAProxy has not started (0).
        *counter = row.get(at)?.parse().unwrap_or(0);
    }
    Some(counters)
}

/// The report's `haproxy`: per load balancer and in total, how much each of [`HIDDEN`]'s
/// counters grew over the run.
pub(crate) fn hidden_by_load_balancers(samples: &[LbSample]) -> Value {
    let last = samples
        .last()
        .map(|sample| sample.hidden.clone())
        .unwrap_or_default();
    let mut out = serde_json::Map::new();
    let mut total = [0u64; HIDDEN.len()];
    for (name, counters) in ["lb1", "lb2"].iter().zip(&last) {
        let mut lb = serde_json::Map::new();
        for (at, (key, _)) in HIDDEN.iter().enumerate() {
            lb.insert(key.to_string(), json!(counters[at]));
            total[at] += counters[at];
        }
        out.insert(name.to_string(), Value::Object(lb));
    }
    out.insert(
        "total".into(),
        HIDDEN
            .iter()
            .enumerate()
            .map(|(at, (key, _))| (key.to_string(), json!(total[at])))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    );
    Value::Object(out)
}

/// (req_tot, hrsp_5xx) of the "api" frontend, from the admin socket.
fn frontend_counters(socket: &Path) -> Option<(u64, u64)> {
    let (header, rows) = show_stat(socket, "-1 1 -1")?;
    let column = |name: &str| header.iter().position(|h| h == name);
    let (req, err) = (column("req_tot")?, column("hrsp_5xx")?);
    let row = rows.iter().find(|row| row.starts_with("api,FRONTEND"))?;
    let row: Vec<&str> = row.split(',').collect();
    Some((row.get(req)?.parse().ok()?, row.get(err)?.parse().ok()?))
}

/// Servers of the "api" backend that are UP (in rotation: not DRAIN, MAINT or DOWN).
fn servers_up(socket: &Path) -> Option<u64> {
    let (header, rows) = show_stat(socket, "-1 4 -1")?;
    let status = header.iter().position(|h| h == "status")?;
    Some(
        rows.iter()
            .filter(|row| row.starts_with("api,"))
            .filter(|row| {
                row.split(',')
                    .nth(status)
                    .is_some_and(|status| status.starts_with("UP"))
            })
            .count() as u64,
    )
}

/// `show stat ARGS` over an HAProxy admin socket: the CSV header's column names, then the rows.
/// `None` when the socket does not answer within a second.
fn show_stat(socket: &Path, args: &str) -> Option<(Vec<String>, Vec<String>)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(format!("show stat {args}\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    let mut lines = out.lines();
    let header = lines
        .next()?
        .trim_start_matches("# ")
        .split(',')
        .map(String::from)
        .collect();
    Some((header, lines.map(String::from).collect()))
}

/// How much of the tier stayed in rotation: the fewest servers UP at once, and the
/// server-seconds out of rotation (summed over samples).
pub(crate) fn capacity(samples: &[LbSample], servers: usize) -> Value {
    let read: Vec<(u64, u64)> = samples
        .iter()
        .filter_map(|sample| sample.in_rotation.map(|up| (sample.at_ms, up)))
        .collect();
    let out_ms: u64 = read
        .windows(2)
        .map(|pair| (pair[1].0 - pair[0].0) * (servers as u64).saturating_sub(pair[0].1))
        .sum();
    json!({
        "servers": servers,
        "min_in_rotation": read.iter().map(|&(_, up)| up).min(),
        "server_seconds_out_of_rotation": out_ms as f64 / 1000.0,
    })
}

pub(crate) fn version_of(tier: &ApiTier, node: &str) -> Option<String> {
    let addr = tier.topology.host(node).addr(crate::topology::API_PORT);
    tier.topology
        .host("client")
        .netns
        .run(move || Connection::connect(addr).ok()?.get("/").ok()?.version)
}

/// For each version: when it was first and last seen, and how often.
pub(crate) fn versions_seen(probes: &[Probe]) -> Value {
    let mut versions: Vec<(String, u64, u64, u64)> = Vec::new();
    for probe in probes {
        let Some(version) = &probe.version else {
            continue;
        };
        match versions.iter_mut().find(|v| &v.0 == version) {
            Some(entry) => {
                entry.2 = probe.at_ms;
                entry.3 += 1;
            }
            None => versions.push((version.clone(), probe.at_ms, probe.at_ms, 1)),
        }
    }
    Value::Array(
        versions
            .into_iter()
            .map(|(version, first, last, count)| {
                json!({"version": version, "first_seen_ms": first, "last_seen_ms": last, "responses": count})
            })
            .collect(),
    )
}

pub(crate) fn samples_json(samples: &[LbSample]) -> Value {
    Value::Array(
        samples
            .iter()
            .map(|s| json!({"at_ms": s.at_ms, "requests": s.requests, "errors_5xx": s.errors_5xx, "vip_holder": s.vip_holder, "in_rotation": s.in_rotation}))
            .collect(),
    )
}

pub(crate) fn probes_json(probes: &[Probe]) -> Value {
    Value::Array(
        probes
            .iter()
            .map(|p| json!({"at_ms": p.at_ms, "status": p.status, "version": p.version}))
            .collect(),
    )
}

/// The summary printed at the end of the demo.
pub fn summary(report: &Value) -> String {
    let mut out = String::new();
    let load = &report["load"];
    out.push_str(&side_by_side(report));
    out.push_str(&format!(
        "\n{:<8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>11} {:>13}\n",
        "node", "in-flight", "idle", "drain", "restart", "healthy", "cut/resets", "gate-refused"
    ));
    let secs = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "-".into(), |ms| format!("{:.2}s", ms as f64 / 1000.0))
    };
    let count = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
    for node in report["nodes"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>5}/{:<5} {:>13}\n",
            node["name"].as_str().unwrap_or("?"),
            count(&node["in_flight_at_drain_start"]),
            count(&node["idle_at_drain_start"]),
            secs(&node["drain_ms"]),
            secs(&node["restart_ms"]),
            secs(&node["time_to_healthy_ms"]),
            count(&node["cut_in_flight"]),
            count(&node["resets_by_node"]),
            count(&node["gate_refused"]),
        ));
    }
    if let Some(capacity) = report["capacity"].as_object() {
        out.push_str(&format!(
            "\ncapacity ({}): {} servers, at least {} in rotation throughout, {} \
             server-seconds out of rotation\n",
            report["operation"].as_str().unwrap_or("cycle"),
            capacity["servers"],
            count(&capacity["min_in_rotation"]),
            capacity["server_seconds_out_of_rotation"]
        ));
    }
    out.push_str(&format!(
        "\nrequests {} of {} scheduled  failed {}  non-2xx {}  not sent {}  latency p50 {:.1} ms  \
         p99 {:.1} ms\n",
        load["requests"],
        load["scheduled"],
        load["failed"],
        load["non_2xx"],
        load["not_sent"],
        load["latency_p50_ms"].as_f64().unwrap_or(0.0),
        load["latency_p99_ms"].as_f64().unwrap_or(0.0),
    ));
    if let Some(failover) = report["failover"].as_object() {
        out.push_str(&format!(
            "VIP failover: HAProxy on {} stopped at {}, VIP on {} at {}\n",
            failover["haproxy_stopped_on"].as_str().unwrap_or("?"),
            secs(&failover["stopped_at_ms"]),
            failover["vip_moved_to"].as_str().unwrap_or("?"),
            secs(&failover["vip_moved_at_ms"]),
        ));
    }
    for version in report["versions_seen"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "version {} seen from {} to {} ({} probe responses)\n",
            version["version"].as_str().unwrap_or("?"),
            secs(&version["first_seen_ms"]),
            secs(&version["last_seen_ms"]),
            version["responses"],
        ));
    }
    out.push_str(&format!("final versions: {}\n", report["final_versions"]));
    out
}

/// The run's load and what the load balancers hid, beside the baseline's when there is one:
/// the demo's first screen.
fn side_by_side(report: &Value) -> String {
    let baseline = &report["baseline"];
    let mut rows: Vec<(String, &Value, &Value)> = Vec::new();
    for (label, key) in [
        ("requests scheduled", "scheduled"),
        ("sent", "sent"),
        ("succeeded (2xx)", "succeeded_2xx"),
        ("failed", "failed"),
        ("answered non-2xx", "non_2xx"),
        ("never sent", "not_sent"),
    ] {
        rows.push((label.into(), &baseline["load"][key], &report["load"][key]));
    }
    for (key, column) in HIDDEN {
        rows.push((
            format!("HAProxy {} ({column})", key.replace('_', " ")),
            &baseline["haproxy"]["total"][key],
            &report["haproxy"]["total"][key],
        ));
    }
    let shown = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
    let mut out = String::new();
    if baseline.is_null() {
        out.push_str(&format!("\n{:<36} {:>16}\n", "", "with the agent"));
        for (label, _, agent) in rows {
            out.push_str(&format!("{label:<36} {:>16}\n", shown(agent)));
        }
    } else {
        out.push_str(&format!(
            "\n{:<36} {:>18} {:>16}\n",
            "", "without the agent", "with the agent"
        ));
        out.push_str(&format!(
            "{:<36} {:>18} {:>16}\n",
            "upgrade",
            format!(
                "restart → {}",
                baseline["final_versions"]
                    .as_object()
                    .and_then(|v| v.values().next())
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            ),
            format!(
                "{} → {}",
                report["operation"].as_str().unwrap_or("?"),
                report["final_versions"]
                    .as_object()
                    .and_then(|v| v.values().next())
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            ),
        ));
        for (label, without, agent) in rows {
            out.push_str(&format!(
                "{label:<36} {:>18} {:>16}\n",
                shown(without),
                shown(agent)
            ));
        }
    }
    out
}
