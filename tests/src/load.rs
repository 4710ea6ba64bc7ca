//! The third-party load generator (oha) at a constant rate, with per-request accounting.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Netns, Process};

/// A running oha; `finish` waits for it and returns its JSON summary.
pub struct Load {
    process: Process,
    output: PathBuf,
    /// Requests its schedule holds (see [`LoadResult::scheduled`]).
    scheduled: u64,
}

/// What the load generator counted.
#[derive(Debug)]
pub struct LoadResult {
    /// Requests the schedule held: `rate × seconds + 1` (oha sends at 0, 1/rate, … up to and
    /// including the deadline when it waits for ongoing requests).
    pub scheduled: u64,
    /// Requests that got an answer or an error: `ok_2xx + non_2xx + errors`.
    pub total: u64,
    pub ok_2xx: u64,
    pub non_2xx: u64,
    pub errors: u64,
    /// Scheduled but never sent: oha drops the requests it could not send before the deadline
    /// (every connection busy) and records nothing for them. A stalled node shows here, not
    /// among the errors.
    pub not_sent: u64,
    pub summary: Value,
}

impl LoadResult {
    /// Panics unless the load was real (`at_least` requests), every scheduled request was
    /// sent, and not one failed or got a non-2xx answer; prints the result either way.
    pub fn assert_no_failures(&self, at_least: u64) {
        eprintln!("load: {self:?}");
        assert!(self.total >= at_least, "too little load: {self:?}");
        assert_eq!(
            (self.errors, self.non_2xx, self.not_sent),
            (0, 0, 0),
            "failed requests: {} / statuses: {} / {} of {} scheduled never sent",
            self.summary["errorDistribution"],
            self.summary["statusCodeDistribution"],
            self.not_sent,
            self.scheduled
        );
    }

    /// The figures a report carries for one run of the load: `scheduled`, `sent`,
    /// `succeeded_2xx`, `non_2xx`, `failed`, `not_sent`.
    pub fn counts(&self) -> Value {
        json!({
            "scheduled": self.scheduled,
            "sent": self.total,
            "succeeded_2xx": self.ok_2xx,
            "non_2xx": self.non_2xx,
            "failed": self.errors,
            "not_sent": self.not_sent,
        })
    }
}

/// How the load generator uses connections.
#[derive(Debug, Clone, Copy)]
pub enum Connections {
    /// Up to N keep-alive connections, reused.
    KeepAlive(u32),
    /// A new connection for every request, up to N at once.
    PerRequest(u32),
}

impl Load {
    /// `rate` requests per second for `duration`.
    pub fn start(
        netns: &Netns,
        dir: &Path,
        url: &str,
        rate: u32,
        duration: Duration,
        connections: Connections,
    ) -> Load {
        Load::start_in(netns.name(), dir, url, rate, duration, connections)
    }

    /// [`Load::start`] in the network namespace named `netns` (from a thread that holds no
    /// reference to its [`Netns`]).
    pub fn start_in(
        netns: &str,
        dir: &Path,
        url: &str,
        rate: u32,
        duration: Duration,
        connections: Connections,
    ) -> Load {
        let (count, extra): (u32, &[&str]) = match connections {
            Connections::KeepAlive(count) => (count, &[]),
            Connections::PerRequest(count) => (count, &["--disable-keepalive"]),
        };
        let output = dir.join("oha.json");
        let log = File::create(dir.join("oha.log")).unwrap();
        let mut command = crate::netns_command(netns, oha_binary());
        command
            .args(["--no-tui", "--wait-ongoing-requests-after-deadline"])
            .args(["--output-format", "json", "-o"])
            .arg(&output)
            .args(["-q", &rate.to_string(), "-c", &count.to_string()])
            // A request unanswered for 30 s counts as failed instead of hanging the run.
            .args(["-t", "30s"])
            .args(extra)
            .args(["-z", &format!("{}s", duration.as_secs()), url])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Load {
            process: Process::spawn("oha", &mut command),
            output,
            scheduled: u64::from(rate) * duration.as_secs() + 1,
        }
    }

    /// Whether oha still runs.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    pub fn finish(mut self, timeout: Duration) -> LoadResult {
        let status = self.process.wait(timeout);
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        assert!(status.success(), "oha failed ({status}): {text}");
        let summary: Value =
            serde_json::from_str(&text).unwrap_or_else(|err| panic!("oha JSON ({err}): {text}"));
        let mut ok_2xx = 0;
        let mut non_2xx = 0;
        for (code, count) in summary["statusCodeDistribution"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let count = count.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                ok_2xx += count;
            } else {
                non_2xx += count;
            }
        }
        let errors = summary["errorDistribution"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, count)| count.as_u64().unwrap_or(0))
            .sum();
        let total = ok_2xx + non_2xx + errors;
        LoadResult {
            scheduled: self.scheduled,
            total,
            ok_2xx,
            non_2xx,
            errors,
            not_sent: self.scheduled.saturating_sub(total),
            summary,
        }
    }
}

/// What one oha run of a windowed load counted.
#[derive(Debug)]
pub struct Window {
    pub index: usize,
    /// When it started, in ms since the run's start.
    pub started_ms: u64,
    pub result: LoadResult,
}

/// oha runs of `window` each on a fixed schedule — run N starts at N × `window` whatever the
/// earlier ones are doing (a run still waiting for a hung request never holds the next one
/// back) — until `stop`; the runs still going then finish.
#[allow(clippy::too_many_arguments)]
pub fn drive_windows(
    netns: &str,
    dir: &Path,
    url: &str,
    rate: u32,
    connections: u32,
    window: Duration,
    started: Instant,
    stop: &AtomicBool,
) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut running: Vec<(usize, u64, Load)> = Vec::new();
    let first = Instant::now();
    let finish = |(index, started_ms, load): (usize, u64, Load)| Window {
        index,
        started_ms,
        result: load.finish(window + Duration::from_secs(60)),
    };
    for index in 0.. {
        let window_dir = dir.join(format!("window-{index:04}"));
        std::fs::create_dir_all(&window_dir).expect("create the load folder");
        let load = Load::start_in(
            netns,
            &window_dir,
            url,
            rate,
            window,
            Connections::PerRequest(connections),
        );
        running.push((index, started.elapsed().as_millis() as u64, load));
        let next = first + window * (index as u32 + 1);
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            // Collect the runs that ended, without waiting for any.
            let mut at = 0;
            while at < running.len() {
                if running[at].2.running() {
                    at += 1;
                } else {
                    windows.push(finish(running.remove(at)));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    windows.extend(running.into_iter().map(finish));
    windows.sort_by_key(|window| window.index);
    windows
}

/// The windows of a [`drive_windows`] load added up: requests, failures, the error and status
/// distributions, the median p50 and the worst p99, and each window's own figures.
pub fn windows_summary(windows: &[Window]) -> Value {
    let mut requests = 0;
    let mut scheduled = 0;
    let mut not_sent = 0;
    let mut ok_2xx = 0;
    let mut non_2xx = 0;
    let mut failed = 0;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut p50s = Vec::new();
    let mut p99_max: f64 = 0.0;
    let mut window_list = Vec::new();
    for window in windows {
        let result = &window.result;
        requests += result.total;
        scheduled += result.scheduled;
        not_sent += result.not_sent;
        ok_2xx += result.ok_2xx;
        non_2xx += result.non_2xx;
        failed += result.errors;
        for (map, field) in [
            (&mut errors, "errorDistribution"),
            (&mut statuses, "statusCodeDistribution"),
        ] {
            for (key, count) in result.summary[field].as_object().into_iter().flatten() {
                *map.entry(key.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
        let latency = &result.summary["latencyPercentiles"];
        let p50 = latency["p50"].as_f64().map(|s| s * 1000.0);
        let p99 = latency["p99"].as_f64().map(|s| s * 1000.0);
        p50s.extend(p50);
        p99_max = p99_max.max(p99.unwrap_or(0.0));
        window_list.push(json!({
            "window": window.index,
            "started_ms": window.started_ms,
            "scheduled": result.scheduled,
            "requests": result.total,
            "failed": result.errors,
            "non_2xx": result.non_2xx,
            "not_sent": result.not_sent,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
        }));
    }
    p50s.sort_by(f64::total_cmp);
    json!({
        "scheduled": scheduled,
        "sent": requests,
        "requests": requests,
        "not_sent": not_sent,
        "succeeded_2xx": ok_2xx,
        "failed": failed,
        "non_2xx": non_2xx,
        "errors": errors,
        "status_codes": statuses,
        "latency_p50_ms_median_of_windows": p50s.get(p50s.len() / 2),
        "latency_p99_ms_worst_window": p99_max,
        "windows": window_list,
    })
}

/// oha from `cargo xtask setup` ($CARGO_HOME/bin) or PATH.
pub fn oha_binary() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_default();
    let installed = home.join("bin/oha");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("oha")
    }
}
