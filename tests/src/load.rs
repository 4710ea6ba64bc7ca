//! The third-party load generator (oha) at a constant rate, with per-request accounting.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

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
