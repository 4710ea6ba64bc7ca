//! `cargo xtask bench`: the figures behind the speed claims, measured on real kernel programs
//! and real traffic in network namespaces.
//!
//! 1. Drain detection: how long after the last response a drain is declared (target: the
//!    quiet period plus a poll), against the fixed sleeps operators use today.
//! 2. Hot path: nanoseconds per packet of the TC programs (kernel BPF run-time statistics), on
//!    a watched port and on an unwatched one (the one-lookup rejection).
//! 3. Status cost: reading status with no connections and with thousands tracked (it must not
//!    scan the flow table).
//! 4. Churn: a million short connections from several client threads; afterwards
//!    `established`, `in_flight`, `unknown` and the table's fill must all be back at 0.

use std::{
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use drain_agent_tests::{Lab, command_output, http::Connection, must, wait_until};

const API: u16 = 8080;
const OTHER: u16 = 9090;
/// A bare accept-answer-close server for the churn (gunicorn would be the bottleneck).
const CHURN: u16 = 9200;
/// Connections the churn opens and closes; `DRAIN_AGENT_CHURN` overrides it.
const CHURN_CONNECTIONS: usize = 1_000_000;
const CHURN_CLIENTS: usize = 8;
const QUIET_MS: u64 = 50;

pub fn run() -> Result<()> {
    crate::demo::require_root()?;
    let lab = Lab::new();
    let _api = lab.start_api(API);
    let agent = lab.start_agent(
        &[("api", &[API]), ("churn", &[CHURN])],
        // No load balancer polls in this lab: a short agent_check_interval keeps the wait for
        // a first poller (docs/operations.md) out of the kernel's detection figure.
        &format!(
            "quiet_period = \"{QUIET_MS}ms\"\nagent_check_listen = \"0.0.0.0:9500\"\n\
             agent_check_interval = \"10ms\""
        ),
        "ebpf",
    );

    println!("drain-agent benchmarks (2 cores, veth between two network namespaces)\n");
    drain_detection(&lab, &agent)?;
    hot_path(&lab, &agent)?;
    status_cost(&lab, &agent)?;
    churn(&lab, &agent)?;
    Ok(())
}

/// A million connect → one byte each way → close, from several threads, through the kernel
/// programs; then every gauge must be back at zero.
fn churn(lab: &Lab, agent: &drain_agent_tests::Agent) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let total: usize = std::env::var("DRAIN_AGENT_CHURN")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CHURN_CONNECTIONS);
    // The client closes first, so TIME_WAIT stays on its side, where `tcp_tw_reuse` lets a
    // new connection take the port again (a node-side TIME_WAIT would make reused tuples
    // wait for SYN retransmissions).
    for sysctl in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ] {
        must(
            "ip",
            &["netns", "exec", lab.client.name(), "sysctl", "-qw", sysctl],
        );
    }
    let listener = lab.node.run(|| TcpListener::bind(("::", CHURN)))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {
                    // Wait for the client's FIN, then close: no TIME_WAIT on this side.
                    let _ = stream.read(&mut byte);
                }
            });
        }
    });
    let addr = Lab::node_addr(false, CHURN);
    let started = Instant::now();
    let clients: Vec<_> = (0..CHURN_CLIENTS)
        .map(|_| {
            let client = lab.client.name().to_string();
            std::thread::spawn(move || {
                drain_agent_tests::enter_netns(&client);
                let mut failures = 0usize;
                for _ in 0..total / CHURN_CLIENTS {
                    let ok = std::net::TcpStream::connect(addr).and_then(|mut stream| {
                        stream.write_all(b"x")?;
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte)
                    });
                    failures += usize::from(ok.is_err());
                }
                failures
            })
        })
        .collect();
    let failures: usize = clients
        .into_iter()
        .map(|client| client.join().unwrap_or(usize::MAX))
        .sum();
    let took = started.elapsed();
    let settled = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "the churn's gauges to settle",
        || {
            let backend = agent.backend("churn");
            backend["established"] == 0 && backend["in_flight"] == 0 && backend["unknown"] == 0
        },
    );
    let backend = agent.backend("churn");
    let table = agent.status()["flow_table"].clone();
    println!("4. churn: {total} short connections from {CHURN_CLIENTS} client threads");
    println!(
        "   {:.1} s ({:.0} connections/s), {failures} failed; gauges at 0 {:.0} ms after the last",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        settled.elapsed().as_secs_f64() * 1000.0
    );
    println!(
        "   accepted {}  closed {}  reset {}  vanished {}  established {}  in flight {}  unknown {}  \
         table entries {}",
        backend["accepted"],
        backend["closed"],
        backend["reset"],
        backend["vanished"],
        backend["established"],
        backend["in_flight"],
        backend["unknown"],
        table["entries"]
    );
    anyhow::ensure!(
        table["entries"] == 0 && failures == 0,
        "the churn left entries in the flow table or failed connections: {backend}"
    );
    Ok(())
}

fn drain_detection(lab: &Lab, agent: &drain_agent_tests::Agent) -> Result<()> {
    const ROUNDS: usize = 15;
    let mut lags = Vec::new();
    let addr = Lab::node_addr(false, API);
    for _ in 0..ROUNDS {
        let mut connection = lab.connect(addr);
        connection.send("/slow?ms=400")?;
        wait_until(Duration::from_secs(2), "the request in flight", || {
            agent.count("api", "in_flight") == 1
        });
        let socket = agent.socket.clone();
        let drain = std::thread::spawn(move || {
            let out = std::process::Command::new(drain_agent_tests::agent_binary())
                .args(["drain", "api", "--wait", "--control-socket"])
                .arg(socket)
                .output();
            (Instant::now(), out)
        });
        let response = connection.read_response()?;
        let answered = Instant::now();
        anyhow::ensure!(response.status == 200, "slow request failed");
        let (drained, out) = drain.join().expect("drain thread");
        anyhow::ensure!(out?.status.success(), "drain failed");
        lags.push(drained.saturating_duration_since(answered));
        anyhow::ensure!(
            agent.cli(&["resume", "api"]).code == Some(0),
            "resume failed"
        );
    }
    lags.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = lags[lags.len() / 2];
    let max = *lags.last().expect("rounds");
    println!(
        "1. drain detection: last response read by the client → `drain --wait` returned ({ROUNDS} rounds)"
    );
    println!(
        "   p50 {:.0} ms   p95 {:.0} ms   max {:.0} ms   (quiet_period {QUIET_MS} ms, CLI start and exit included)",
        ms(p50),
        ms(lags[lags.len() * 95 / 100]),
        ms(max)
    );
    println!(
        "   vs a fixed 300 s sleep (AWS deregistration delay): {:.0}x sooner; vs 600 s (Envoy drain): {:.0}x sooner\n",
        300.0 / p50.as_secs_f64(),
        600.0 / p50.as_secs_f64()
    );
    Ok(())
}

fn hot_path(lab: &Lab, agent: &drain_agent_tests::Agent) -> Result<()> {
    // An unwatched service next to the API: its packets take the one-lookup rejection.
    let other = lab
        .node
        .run(|| TcpListener::bind(SocketAddr::new("::".parse().unwrap(), OTHER)));
    let other = other.context("bind the unwatched port")?;
    std::thread::spawn(move || {
        for stream in other.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = std::io::copy(&mut stream.try_clone().unwrap(), &mut stream);
            });
        }
    });
    let status = agent.status();
    let programs: Vec<(String, u64)> = status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["direction"].as_str().unwrap_or("?").to_string(),
                a["program_id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    must("sysctl", &["-qw", "kernel.bpf_stats_enabled=1"]);
    let stats = || -> Vec<(u64, u64)> {
        programs
            .iter()
            .map(|(_, id)| {
                let out = command_output("bpftool", &["-j", "prog", "show", "id", &id.to_string()]);
                let json: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                (
                    json["run_time_ns"].as_u64().unwrap_or(0),
                    json["run_cnt"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let measure = |port: u16, what: &str| -> Result<()> {
        let before = stats();
        let addr = Lab::node_addr(false, port);
        let started = Instant::now();
        let requests = lab.client.run(move || -> std::io::Result<u64> {
            let mut count = 0;
            let mut connection = Connection::connect(addr)?;
            while started.elapsed() < Duration::from_secs(3) {
                if port == API {
                    connection.get("/")?;
                } else {
                    use std::io::{Read as _, Write as _};
                    let stream = connection.stream();
                    let mut buf = [0u8; 64];
                    (&*stream).write_all(b"ping ping ping\n")?;
                    let _ = (&*stream).read(&mut buf)?;
                }
                count += 1;
            }
            Ok(count)
        })?;
        let after = stats();
        print!("   {what:<34} {requests:>6} round trips:");
        for ((direction, _), (b, a)) in programs.iter().zip(before.iter().zip(after.iter())) {
            let runs = a.1.saturating_sub(b.1).max(1);
            print!(
                "  {direction} {:.0} ns/packet ({runs} packets)",
                a.0.saturating_sub(b.0) as f64 / runs as f64
            );
        }
        println!();
        Ok(())
    };
    println!("2. hot path: TC program run time per packet (kernel.bpf_stats_enabled)");
    measure(API, "watched port (HTTP keep-alive)")?;
    measure(OTHER, "unwatched port (echo)")?;
    must("sysctl", &["-qw", "kernel.bpf_stats_enabled=0"]);
    println!();
    Ok(())
}

fn status_cost(lab: &Lab, agent: &drain_agent_tests::Agent) -> Result<()> {
    let time_status = |rounds: usize| -> Duration {
        let started = Instant::now();
        for _ in 0..rounds {
            let _ = agent.status();
        }
        started.elapsed() / rounds as u32
    };
    let empty = time_status(50);
    let addr = Lab::node_addr(false, API);
    let held: Vec<Connection> = (0..1500).map(|_| lab.connect(addr)).collect();
    wait_until(
        Duration::from_secs(10),
        "1500 connections established",
        || agent.count("api", "established") >= 1500,
    );
    let full = time_status(50);
    println!("3. `drain-agent status` (CLI process included), 50 calls each");
    println!(
        "   {:>5} connections tracked: {:.2} ms   {:>5} tracked: {:.2} ms   ratio {:.2} (O(backends × CPUs), no flow-table scan)",
        0,
        empty.as_secs_f64() * 1000.0,
        held.len(),
        full.as_secs_f64() * 1000.0,
        full.as_secs_f64() / empty.as_secs_f64()
    );
    Ok(())
}
