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
}

/// What the load generator counted.
#[derive(Debug)]
pub struct LoadResult {
    pub total: u64,
    pub ok_2xx: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub summary: Value,
}

impl LoadResult {
    /// Panics unless the load was real (`at_least` requests) and not one request failed or
    /// got a non-2xx answer; prints the result either way.
    pub fn assert_no_failures(&self, at_least: u64) {
        eprintln!("load: {self:?}");
        assert!(self.total >= at_least, "too little load: {self:?}");
        assert_eq!(
            (self.errors, self.non_2xx),
            (0, 0),
            "failed requests: {} / statuses: {}",
            self.summary["errorDistribution"],
            self.summary["statusCodeDistribution"]
        );
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
        }
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
        LoadResult {
            total: ok_2xx + non_2xx + errors,
            ok_2xx,
            non_2xx,
            errors,
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

/// oha runs of `window` each, every one started when the previous one's deadline passes (the
/// previous one still waits for its last answers), until `stop`; the last one runs to its end.
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
    let mut running: Option<(usize, u64, Load)> = None;
    let mut next = Instant::now();
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
        let started_ms = started.elapsed().as_millis() as u64;
        if let Some((index, started_ms, previous)) = running.replace((index, started_ms, load)) {
            let result = previous.finish(window + Duration::from_secs(60));
            windows.push(Window {
                index,
                started_ms,
                result,
            });
        }
        next += window;
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    if let Some((index, started_ms, last)) = running {
        windows.push(Window {
            index,
            started_ms,
            result: last.finish(window + Duration::from_secs(60)),
        });
    }
    windows
}

/// The windows of a [`drive_windows`] load added up: requests, failures, the error and status
/// distributions, the median p50 and the worst p99, and each window's own figures.
pub fn windows_summary(windows: &[Window]) -> Value {
    let mut requests = 0;
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
            "requests": result.total,
            "failed": result.errors,
            "non_2xx": result.non_2xx,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
        }));
    }
    p50s.sort_by(f64::total_cmp);
    json!({
        "requests": requests,
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
