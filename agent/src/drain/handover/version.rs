//! One version of a service: finding its listeners and processes, starting it (units), and
//! stopping it.

use std::{
    collections::BTreeSet,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use crate::{
    config::{Action, Handover, HandoverHow, Step},
    kernel::listeners::{self, Listener},
    service,
};

/// One version of the service: its instance slot, its listeners and who holds them.
pub(super) struct Version {
    pub(super) slot: u32,
    /// Its listeners.
    pub(super) listeners: Vec<Listener>,
    /// The agent's copies of them, until they are in the steering map: held any longer, a
    /// copy would keep a listener open (and in the SO_REUSEPORT group) after its process
    /// closed it, and connections the kernel still hashed to it would never be accepted.
    pub(super) copies: Vec<OwnedFd>,
    pub(super) pids: Vec<i32>,
    /// The process that owns the listeners (the pre-fork master), signalled by a stop
    /// without a command.
    pub(super) owner: Option<i32>,
    pub(super) unit: Option<String>,
}

/// Finds the processes holding `found` and takes a copy of each listener.
pub(super) fn version_of(
    slot: u32,
    found: Vec<Listener>,
    unit: Option<String>,
) -> Result<Version, String> {
    let inodes: BTreeSet<u64> = found.iter().map(|listener| listener.inode).collect();
    let holding = listeners::holders(&inodes);
    let mut listeners_found = Vec::new();
    let mut copies = Vec::new();
    let mut pids = BTreeSet::new();
    let mut owner = None;
    for listener in found {
        let Some(holders) = holding.get(&listener.inode) else {
            return Err(listeners::ListenerError::NoHolder {
                local: listener.local,
                inode: listener.inode,
            }
            .to_string());
        };
        pids.extend(holders.iter().map(|&(pid, _)| pid));
        owner = owner.or_else(|| listeners::owner(holders));
        let (pid, fd) = holders[0];
        let socket = listeners::take(listener.local, pid, fd).map_err(|err| err.to_string())?;
        listeners_found.push(listener);
        copies.push(socket);
    }
    Ok(Version {
        slot,
        listeners: listeners_found,
        copies,
        pids: pids.into_iter().collect(),
        owner,
        unit,
    })
}

/// Of two units, the active one (old) and the other (new).
pub(super) async fn units_in_order(pair: &[String; 2]) -> Result<(String, String), String> {
    let mut active = Vec::new();
    for unit in pair {
        let status = tokio::process::Command::new("systemctl")
            .args(["is-active", "--quiet", unit])
            .status()
            .await
            .map_err(|err| format!("cannot run systemctl: {err}"))?;
        active.push(status.success());
    }
    match active[..] {
        [true, false] => Ok((pair[0].clone(), pair[1].clone())),
        [false, true] => Ok((pair[1].clone(), pair[0].clone())),
        _ => Err(format!(
            "of the units {} and {}, exactly one must be active (the version serving now); {}",
            pair[0],
            pair[1],
            if active[0] { "both are" } else { "neither is" }
        )),
    }
}

/// Stops a version: its unit, the `stop` command (with `DRAIN_AGENT_PIDS`), or SIGTERM to
/// its owner.
pub(super) async fn stop(
    handover: &Handover,
    pids: &[i32],
    owner: Option<i32>,
    unit: Option<String>,
) -> Result<(), String> {
    let pid_list = pids
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let command = match (&handover.how, unit) {
        (HandoverHow::Units(_), Some(unit)) => {
            Some(vec!["systemctl".to_string(), "stop".to_string(), unit])
        }
        (
            HandoverHow::Commands {
                stop: Some(stop), ..
            },
            _,
        ) => Some(stop.clone()),
        _ => None,
    };
    match command {
        Some(argv) => {
            let step = Step {
                action: Action::Command(argv),
                timeout: handover.timeout,
            };
            service::run_with_env(&step, &[("DRAIN_AGENT_PIDS", pid_list)], |_| {})
                .await
                .map_err(|err| err.to_string())
        }
        None => {
            let Some(owner) = owner else {
                return Err("no process to stop".into());
            };
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(owner),
                nix::sys::signal::Signal::SIGTERM,
            )
            .map_err(|err| format!("SIGTERM to pid {owner}: {err}"))
        }
    }
}

/// When `pid` started (clock ticks since boot), if it runs.
pub(super) fn started_at(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .ok()
        .map(|stat| stat.starttime)
}

/// This boot's identity: pids and start times from another boot mean nothing.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// Of journaled `pids` (with their start times, recorded on `boot`), those that are still
/// the same processes: same boot, same start time. Only these may be signalled or have
/// descriptors taken (`pidfd_getfd`); the rest are returned apart.
pub(super) fn still_running(pids: &[i32], starts: &[u64], boot: &str) -> (Vec<i32>, Vec<i32>) {
    let same_boot = !boot.is_empty() && boot == boot_id();
    let mut same = Vec::new();
    let mut other = Vec::new();
    for (at, &pid) in pids.iter().enumerate() {
        if same_boot
            && starts
                .get(at)
                .is_some_and(|&start| started_at(pid) == Some(start))
        {
            same.push(pid);
        } else {
            other.push(pid);
        }
    }
    (same, other)
}

/// Of a version's processes, the one whose parent is not among them.
pub(super) fn owner_of(pids: &[i32]) -> Option<i32> {
    listeners::owner(&pids.iter().map(|&pid| (pid, 0)).collect::<Vec<_>>())
}

/// Waits until none of `pids` runs (zombies count as gone), at most `bound`.
pub(super) async fn wait_exit(pids: &[i32], bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        let running = pids.iter().any(|&pid| {
            procfs::process::Process::new(pid)
                .and_then(|process| process.stat())
                .is_ok_and(|stat| stat.state != 'Z')
        });
        if !running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
