//! One agent per interface, and one per state directory. Two agents watching the same
//! interface fight over the server's state (each answers the load balancers' agent checks with
//! its own phase); two agents with one `state_dir` share one journal, and each would adopt the
//! other's backends of the same name. A second `drain-agent run` is refused, naming the first.
//!
//! Each watched interface is an flock on a file under `/run/drain-agent/interfaces/`, named
//! by network namespace and interface index (two namespaces may both have an `eth0`). The
//! kernel releases the lock when the process ends, however it ends: a crashed agent never
//! blocks the next one, unlike a pid file. The file says who holds it.

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;

/// Where the interface locks live (the unit's `RuntimeDirectory=drain-agent`).
pub const LOCK_DIR: &str = "/run/drain-agent/interfaces";
/// The state directory's lock, beside the journal.
const STATE_LOCK: &str = "agent.lock";

/// The interfaces this agent watches, held until it is dropped (at exit).
pub struct Watch {
    _locks: Vec<Flock<File>>,
}

/// Who holds an interface: what the first agent wrote in its lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub interface: String,
    pub pid: String,
    pub config: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drain-agent pid {} (config {}) already watches interface `{}`",
            self.pid, self.config, self.interface
        )
    }
}

/// Why the interfaces could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "refused: {0}. Two agents on one interface fight over the server's state (each \
         answers the load balancers' agent checks): stop that one first (`systemctl stop \
         drain-agent`, or `kill {pid}`), or give this one other interfaces",
        pid = .0.pid
    )]
    Busy(Holder),
    #[error(
        "refused: drain-agent pid {pid} (config {config}) already uses state_dir {}. Two agents \
         with one state_dir share one operation journal and would adopt each other's backends \
         of the same name: give each agent its own `state_dir`, or stop that one first",
        state_dir.display(),
        pid = holder.pid,
        config = holder.config
    )]
    StateDirBusy { state_dir: PathBuf, holder: Holder },
    #[error("cannot use the interface lock {path}: {reason}")]
    Lock {
        path: PathBuf,
        reason: std::io::Error,
    },
}

/// Claims every interface of `config` for this process, or names the agent that holds one.
pub fn claim(config: &Config) -> Result<Watch, InstanceError> {
    let mut locks = Vec::new();
    let me = format!(
        "pid={}\nconfig={}\n",
        std::process::id(),
        config.path.display()
    );
    // The state directory first: its refusal stands even where the interface locks cannot
    // be taken (no write access to /run/drain-agent).
    match take(&config.state_dir.join(STATE_LOCK), &me)? {
        Taken::Locked(lock) => locks.push(lock),
        Taken::Held(mut file) => {
            return Err(InstanceError::StateDirBusy {
                state_dir: config.state_dir.clone(),
                holder: holder_of("", &mut file),
            });
        }
    }
    for interface in &config.interfaces {
        match take(
            &lock_path(interface)?,
            &format!("{me}interface={interface}\n"),
        )? {
            Taken::Locked(lock) => locks.push(lock),
            Taken::Held(mut file) => {
                return Err(InstanceError::Busy(holder_of(interface, &mut file)));
            }
        }
    }
    Ok(Watch { _locks: locks })
}

/// A lock taken, or the file of one another process holds.
enum Taken {
    Locked(Flock<File>),
    Held(File),
}

/// Takes the lock at `path` and writes who holds it (`contents`).
fn take(path: &Path, contents: &str) -> Result<Taken, InstanceError> {
    let error = |reason| InstanceError::Lock {
        path: path.to_path_buf(),
        reason,
    };
    let file = open(path).map_err(error)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Taken::Held(file)),
        Err((_, errno)) => return Err(error(errno.into())),
    };
    lock.set_len(0).map_err(error)?;
    lock.write_all(contents.as_bytes()).map_err(error)?;
    Ok(Taken::Locked(lock))
}

/// The agents that hold any of `config`'s interfaces now (nothing is kept locked).
pub fn holders(config: &Config) -> Result<Vec<Holder>, InstanceError> {
    let mut holders = Vec::new();
    for interface in &config.interfaces {
        let path = lock_path(interface)?;
        if !path.exists() {
            continue;
        }
        let file = File::open(&path).map_err(|reason| InstanceError::Lock {
            path: path.clone(),
            reason,
        })?;
        if let Err((mut file, nix::errno::Errno::EWOULDBLOCK)) =
            Flock::lock(file, FlockArg::LockSharedNonblock)
        {
            holders.push(holder_of(interface, &mut file));
        }
    }
    Ok(holders)
}

/// The lock file of an interface in this network namespace.
fn lock_path(interface: &str) -> Result<PathBuf, InstanceError> {
    let namespace = Path::new("/proc/self/ns/net");
    let netns = std::fs::metadata(namespace)
        .map_err(|reason| InstanceError::Lock {
            path: namespace.to_owned(),
            reason,
        })?
        .ino();
    let index = nix::net::if_::if_nametoindex(interface).map_err(|errno| InstanceError::Lock {
        path: PathBuf::from(format!("interface {interface}")),
        reason: errno.into(),
    })?;
    Ok(Path::new(LOCK_DIR).join(format!("netns-{netns}-ifindex-{index}.lock")))
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// What the holder wrote in the lock file.
fn holder_of(interface: &str, file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut text);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or("unknown")
            .to_string()
    };
    Holder {
        interface: interface.to_string(),
        pid: field("pid"),
        config: field("config"),
    }
}
