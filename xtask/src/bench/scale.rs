//! 100,000 established tracked connections: what `status` costs then, against what an
//! operator's tools pay to learn the same from the kernel at the same moment (reading
//! /proc/net/tcp and tcp6, `ss -tn` over netlink), and the agent's memory.
//!
//! A process may hold 20,000 open files here (hard limit, not raisable without
//! CAP_SYS_RESOURCE), and each end of a connection is a file: the connections are spread over
//! several client processes (one source address each) and several server processes sharing
//! the port with SO_REUSEPORT.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use drain_agent_tests::{Agent, CLIENT_V4, Lab, NODE_V4, Process, agent_binary, wait_until};

use super::{Figure, median, status_over_socket};

/// Connections held open; `DRAIN_AGENT_SCALE` overrides it.
const CONNECTIONS: usize = 100_000;
/// Client and server processes: 100,000 / 7 ≈ 14,300 each, below the 20,000 files a process
/// may hold, with room for SO_REUSEPORT's uneven spread over the servers.
const PROCESSES: usize = 7;
const STATUS_CALLS: usize = 200;
const CLI_CALLS: usize = 20;

/// Accepts and holds every connection until killed.
const SERVER: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", int(sys.argv[1])))
listener.listen(65535)
print("listening", flush=True)
held = []
while True:
    connection, _ = listener.accept()
    held.append(connection)
"#;

/// Opens COUNT connections from SOURCE to DEST:PORT and holds them until killed.
const CLIENT: &str = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
source, dest, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
IP_BIND_ADDRESS_NO_PORT = 24
held = []
for _ in range(count):
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    connection.bind((source, 0))
    connection.connect((dest, port))
    held.append(connection)
print("connected", len(held), flush=True)
while True:
    time.sleep(3600)
"#;

pub fn status_at_scale(lab: &Lab, agent: &Agent, port: u16) -> Result<Vec<Figure>> {
    let total = super::count_from_env("DRAIN_AGENT_SCALE", CONNECTIONS);
    let rss_before = rss_kib(agent.process.pid())?;
    let storage_before = storage_objects()?;
    for sysctl in [
        "net.core.somaxconn=65535",
        "net.ipv4.tcp_max_syn_backlog=65535",
    ] {
        lab.node.sysctl(sysctl);
    }
    let dir = lab.dir.path();
    std::fs::write(dir.join("hold-server.py"), SERVER)?;
    std::fs::write(dir.join("hold-client.py"), CLIENT)?;

    let mut servers: Vec<Process> = (0..PROCESSES)
        .map(|_| {
            let mut command = lab.node.command("python3");
            command
                .arg(dir.join("hold-server.py"))
                .arg(port.to_string())
                .stdout(Stdio::piped());
            Process::spawn("hold-server", &mut command)
        })
        .collect();
    // Every server in the SO_REUSEPORT group before the first connection, or the first one
    // gets them all.
    for server in &mut servers {
        wait_line(server, "listening")?;
    }
    let opened = Instant::now();
    let per_client = total.div_ceil(PROCESSES);
    let mut clients: Vec<Process> = Vec::new();
    let client_prefix = CLIENT_V4.rsplit_once('.').expect("IPv4").0;
    for index in 0..PROCESSES {
        let source = format!("{client_prefix}.{}", 101 + index);
        lab.client
            .ip(&["addr", "add", &format!("{source}/24"), "dev", "eth0"]);
        let count = per_client.min(total - index * per_client);
        let mut command = lab.client.command("python3");
        command
            .arg(dir.join("hold-client.py"))
            .args([
                source.as_str(),
                NODE_V4,
                &port.to_string(),
                &count.to_string(),
            ])
            .stdout(Stdio::piped());
        clients.push(Process::spawn("hold-client", &mut command));
    }
    // Until all are counted, or no progress for 30 s (then say where it stopped).
    let mut last = (0, Instant::now());
    loop {
        let established = agent.count("scale", "established");
        if established >= total as u64 {
            break;
        }
        if established > last.0 {
            last = (established, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(30) {
            let running = clients
                .iter_mut()
                .map(|client| usize::from(client.running()))
                .sum::<usize>();
            let sockets = lab.node.command("ss").arg("-s").output()?;
            anyhow::bail!(
                "stuck at {established} of {total} connections counted; {running} of {PROCESSES} \
                 client processes running; node sockets:\n{}",
                String::from_utf8_lossy(&sockets.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let open_seconds = opened.elapsed().as_secs_f64();
    let backend = agent.backend("scale");
    println!(
        "scale: {total} connections established in {open_seconds:.1} s from {PROCESSES} client \
         processes to {PROCESSES} servers; tracked {} (in flight {}, idle {})",
        backend["flow_table_entries"], backend["in_flight"], backend["idle"]
    );

    // At the same moment: the agent's answer, and what the kernel's own tables cost to read.
    let mut status_ms = Vec::new();
    for _ in 0..STATUS_CALLS {
        let started = Instant::now();
        let status = status_over_socket(&agent.socket)?;
        status_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            status["backends"].is_array(),
            "status without backends: {status}"
        );
    }
    status_ms.sort_by(f64::total_cmp);
    let status_p50 = status_ms[status_ms.len() / 2];
    let status_p99 = status_ms[status_ms.len() * 99 / 100];
    let cli_ms = median(
        (0..CLI_CALLS)
            .map(|_| {
                let started = Instant::now();
                let out = Command::new(agent_binary())
                    .args(["status", "--json", "--control-socket"])
                    .arg(&agent.socket)
                    .output();
                ensure!(
                    out.is_ok_and(|out| out.status.success()),
                    "drain-agent status failed"
                );
                Ok(started.elapsed().as_secs_f64() * 1000.0)
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let (procfs_ms, procfs_lines) = lab.node.run(|| -> Result<(f64, usize)> {
        let mut times = Vec::new();
        let mut lines = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let mut text = Vec::new();
            for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
                std::fs::File::open(table)
                    .and_then(|mut file| file.read_to_end(&mut text))
                    .with_context(|| format!("reading {table}"))?;
            }
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            lines = text.iter().filter(|&&byte| byte == b'\n').count();
        }
        Ok((median(times), lines))
    })?;
    ensure!(
        procfs_lines >= total,
        "/proc/net/tcp{{,6}} lists {procfs_lines} sockets, fewer than the {total} held"
    );
    let ss_ms = median(
        (0..3)
            .map(|_| {
                let started = Instant::now();
                let status = lab
                    .node
                    .command_keeping_mounts("ss")
                    .arg("-tn")
                    .stdout(Stdio::null())
                    .status()?;
                ensure!(status.success(), "ss -tn failed");
                Ok(started.elapsed().as_secs_f64() * 1000.0)
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let rss_at_scale = rss_kib(agent.process.pid())?;
    let storage_per_connection = storage_objects()?.saturating_sub(storage_before) as f64
        * STORAGE_OBJECT_BYTES as f64
        / total as f64;
    let maps = map_memory(agent.process.pid())?;
    println!(
        "status over the control socket: p50 {status_p50:.3} ms, p99 {status_p99:.3} ms \
         ({STATUS_CALLS} calls); the CLI (process start included) p50 {cli_ms:.1} ms"
    );
    println!(
        "same moment: /proc/net/tcp + tcp6 {procfs_ms:.0} ms ({procfs_lines} lines), ss -tn {ss_ms:.0} ms"
    );
    println!(
        "agent RSS {:.1} MiB with {total} tracked (before: {:.1} MiB); all maps {:.1} MiB \
         kernel memory (the flows are in their sockets' storage, not in a map's memlock)",
        rss_at_scale as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        maps as f64 / 1048576.0
    );
    println!(
        "socket storage: {storage_per_connection:.0} bytes per tracked connection ({} slab grew \
         by {:.1} MiB)",
        STORAGE_SLAB,
        storage_per_connection * total as f64 / 1048576.0
    );

    drop(clients);
    drop(servers);
    wait_until(
        Duration::from_secs(120),
        "the held connections to be closed and untracked",
        || agent.count("scale", "established") == 0,
    );

    let thousands = total / 1000;
    Ok(vec![
        Figure {
            name: format!("status p50 at {thousands}k connections (control socket)"),
            value: status_p50,
            unit: "ms",
            baseline: None,
            target: "≤ 1 ms".into(),
            met: Some(status_p50 <= 1.0),
        },
        Figure {
            name: format!("drain-agent status CLI at {thousands}k (process start)"),
            value: cli_ms,
            unit: "ms",
            baseline: None,
            target: "reported apart".into(),
            met: None,
        },
        Figure {
            name: format!("reading /proc/net/tcp + tcp6 at {thousands}k"),
            value: procfs_ms,
            unit: "ms",
            baseline: Some(("status p50, same moment".into(), status_p50)),
            target: "ratio ≥ 500 (status faster)".into(),
            met: Some(procfs_ms / status_p50 >= 500.0),
        },
        Figure {
            name: format!("ss -tn (netlink) at {thousands}k"),
            value: ss_ms,
            unit: "ms",
            baseline: Some(("status p50, same moment".into(), status_p50)),
            target: "ratio ≥ 50 (status faster)".into(),
            met: Some(ss_ms / status_p50 >= 50.0),
        },
        Figure {
            name: format!("agent RSS with {thousands}k tracked connections"),
            value: rss_at_scale as f64 / 1024.0,
            unit: "MiB",
            baseline: Some((
                "the same agent before they opened".into(),
                rss_before as f64 / 1024.0,
            )),
            target: "≤ 20 MiB".into(),
            met: Some(rss_at_scale as f64 / 1024.0 <= 20.0),
        },
        Figure {
            name: "flow memory per tracked connection (socket storage, slab growth)".into(),
            value: storage_per_connection,
            unit: "bytes",
            baseline: None,
            target: "reported".into(),
            met: None,
        },
        Figure {
            name: "kernel memory of the agent's maps (memlock; flows are in socket storage)".into(),
            value: maps as f64 / 1048576.0,
            unit: "MiB",
            baseline: None,
            target: "reported".into(),
            met: None,
        },
    ])
}

/// Reads the child's stdout until a line starting with `prefix`.
fn wait_line(process: &mut Process, prefix: &str) -> Result<()> {
    let stdout = process.stdout().context("no stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte)? == 1 {
        if byte[0] == b'\n' {
            if line.starts_with(prefix.as_bytes()) {
                return Ok(());
            }
            line.clear();
        } else {
            line.push(byte[0]);
        }
    }
    anyhow::bail!("the process ended before printing {prefix:?}")
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The slab cache socket storage comes from: the flow's element (a 128-byte header, the
/// data cache-line aligned, and the 64-byte `Flow`) and each socket's storage header (176
/// bytes) are both 192-byte, memory-cgroup-accounted allocations.
const STORAGE_SLAB: &str = "kmalloc-cg-192";
const STORAGE_OBJECT_BYTES: u64 = 192;

/// Objects in use in `STORAGE_SLAB` (`/proc/slabinfo`, root only).
fn storage_objects() -> Result<u64> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    slabinfo
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == STORAGE_SLAB).then(|| fields.next()?.parse().ok())?
        })
        .with_context(|| format!("no {STORAGE_SLAB} in /proc/slabinfo"))
}

/// Kernel memory of the agent's maps (`memlock` in each map fd's fdinfo). Socket storage is
/// allocated per socket and is not part of its map's figure.
fn map_memory(pid: u32) -> Result<u64> {
    let mut memory = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| {
                    let value = value.trim();
                    value.strip_prefix("0x").map_or_else(
                        || value.parse().ok(),
                        |hex| u64::from_str_radix(hex, 16).ok(),
                    )
                })
        };
        let (Some(_), Some(memlock)) = (field("map_type:"), field("memlock:")) else {
            continue;
        };
        memory += memlock;
    }
    Ok(memory)
}
