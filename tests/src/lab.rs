//! A long-lived copy of the demo tier for exploration: `cargo xtask lab up|status|down`.
//! Everything it creates is named from one prefix and lives under one directory, so `down`
//! can remove it all — also after a crash, without any state file.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    TempDir, agent_binary, command_output,
    tier::{ApiTier, VIP, host_names},
    topology::{API_PORT, FRONTEND_PORT, Topology},
};

/// Where a lab lives: namespaces `<prefix>-<host>`, files under `dir`.
#[derive(Debug, Clone)]
pub struct LabName {
    pub prefix: String,
    pub dir: PathBuf,
}

impl LabName {
    /// The lab `cargo xtask lab` manages.
    pub fn default_lab() -> LabName {
        LabName {
            prefix: "dalab".into(),
            dir: PathBuf::from("/tmp/drain-agent-lab"),
        }
    }

    fn namespaces(&self) -> Vec<String> {
        let out = command_output("ip", &["netns", "list"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect()
    }
}

/// Starts the tier with `nodes` API nodes and leaves it running; returns how to reach it.
pub fn up(lab: &LabName, nodes: usize) -> String {
    if !lab.namespaces().is_empty() {
        down(lab);
    }
    let names = host_names(nodes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let topology = Topology::build(
        &format!("{}-{{}}", lab.prefix),
        TempDir::at(lab.dir.clone()),
        &names,
    );
    let tier = ApiTier::start(topology, nodes, "1.0");
    let guide = guide(lab, &tier);
    tier.leak();
    guide
}

fn guide(lab: &LabName, tier: &ApiTier) -> String {
    let mut out = format!(
        "lab is up under {} (VIP {VIP}:{FRONTEND_PORT}, held by {})\n\n",
        lab.dir.display(),
        tier.vip_holder().unwrap_or_else(|| "nobody".into())
    );
    for host in &tier.topology.hosts {
        out.push_str(&format!(
            "  {:<7} {:<15} ip netns exec {} bash\n",
            host.name,
            host.v4,
            host.netns.name()
        ));
    }
    out.push_str(&format!(
        "\ntry:\n  ip netns exec {p}-client curl -si http://{VIP}:{FRONTEND_PORT}/\n  \
         {agent} status --control-socket {dir}/node1/control.sock\n  \
         {agent} cycle api --control-socket {dir}/node1/control.sock\n  \
         echo 'show stat' | socat stdio unix-connect:{dir}/lb1/admin.sock\n\
         the API listens on port {API_PORT} of every node; `cargo xtask lab down` removes it all\n",
        p = lab.prefix,
        agent = agent_binary().display(),
        dir = lab.dir.display(),
    ));
    out
}

/// Each node's agent status, the VIP holder and HAProxy's view.
pub fn status(lab: &LabName) -> String {
    let namespaces = lab.namespaces();
    if namespaces.is_empty() {
        return "no lab is running (`cargo xtask lab up` starts one)\n".into();
    }
    let mut out = String::new();
    for lb in ["lb1", "lb2"] {
        let holds = crate::tier::holds_vip(&format!("{}-{lb}", lab.prefix));
        out.push_str(&format!(
            "{lb}: {}\n",
            if holds { "holds the VIP" } else { "backup" }
        ));
    }
    let mut node = 1;
    while namespaces.contains(&format!("{}-node{node}", lab.prefix)) {
        let socket = lab.dir.join(format!("node{node}/control.sock"));
        let out_status = Command::new(agent_binary())
            .args(["status", "--control-socket"])
            .arg(&socket)
            .output();
        out.push_str(&format!("\nnode{node}:\n"));
        match out_status {
            Ok(output) => {
                out.push_str(&String::from_utf8_lossy(&output.stdout));
                out.push_str(&String::from_utf8_lossy(&output.stderr));
            }
            Err(err) => out.push_str(&format!("  cannot run drain-agent: {err}\n")),
        }
        node += 1;
    }
    out
}

/// Kills every process in the lab's namespaces, deletes the namespaces (and with them every
/// veth and the bridge), and removes the directory. Returns what it removed.
pub fn down(lab: &LabName) -> Vec<String> {
    let namespaces = lab.namespaces();
    // A killed gunicorn master or keepalived parent may have forked a replacement just before
    // it died, and a process hit by SIGKILL is still listed until it has finished exiting: so
    // kill in rounds until nothing in the namespaces or using the lab's files is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pids = lab_pids(&namespaces, &lab.dir);
        if pids.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            eprintln!(
                "warning: lab processes still running after SIGKILL: {}",
                pids.join(" ")
            );
            break;
        }
        for pid in &pids {
            let _ = command_output("kill", &["-9", pid]);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut removed = Vec::new();
    for netns in namespaces {
        let _ = command_output("ip", &["netns", "del", &netns]);
        removed.push(netns);
    }
    if lab.dir.exists() {
        let _ = std::fs::remove_dir_all(&lab.dir);
        removed.push(lab.dir.display().to_string());
    }
    removed
}

/// Processes inside the lab's namespaces, and any that left them (none should) but still use
/// the lab's files, found by their command line.
fn lab_pids(namespaces: &[String], dir: &Path) -> Vec<String> {
    let mut pids: Vec<String> = Vec::new();
    for netns in namespaces {
        let out = command_output("ip", &["netns", "pids", netns]);
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
    }
    let out = command_output("pgrep", &["-f", &dir.display().to_string()]);
    pids.extend(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string),
    );
    pids.sort();
    pids.dedup();
    pids
}
