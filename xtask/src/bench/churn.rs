//! A million connect → one byte each way → close, from several threads, through the kernel
//! programs; then every gauge and the flow table must be back at zero.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::Result;
use drain_agent_tests::{Agent, Lab, wait_until};

use super::Figure;

/// Connections the churn opens and closes; `DRAIN_AGENT_CHURN` overrides it.
const CHURN_CONNECTIONS: usize = 1_000_000;
const CHURN_CLIENTS: usize = 8;

pub fn run(lab: &Lab, agent: &Agent, port: u16) -> Result<Figure> {
    use std::io::{Read as _, Write as _};
    let total = super::count_from_env("DRAIN_AGENT_CHURN", CHURN_CONNECTIONS);
    // The client closes first, so TIME_WAIT stays on its side, where `tcp_tw_reuse` lets a
    // new connection take the port again (a node-side TIME_WAIT would make reused tuples
    // wait for SYN retransmissions).
    for sysctl in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ] {
        lab.client.sysctl(sysctl);
    }
    let listener = lab.node.run(move || TcpListener::bind(("::", port)))?;
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
    let addr = Lab::node_addr(false, port);
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
    println!("churn: {total} short connections from {CHURN_CLIENTS} client threads");
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
    Ok(Figure {
        name: format!("churn: {total} short connections, all gauges back at 0"),
        value: total as f64 / took.as_secs_f64(),
        unit: "conn/s",
        baseline: None,
        target: "table and gauges at 0 (checked)".into(),
        met: None,
    })
}
