//! Where connection numbers come from: the eBPF programs, or /proc in degraded mode.

pub mod backends;
pub mod ebpf;
pub mod features;
pub mod gate;
pub mod listeners;
pub mod procfs;
pub mod sockets;
pub mod steer;

use std::time::Duration;

use crate::{config::Config, status::Attachment};

/// Which source `run --kernel` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelMode {
    /// TC programs track every connection; in-flight and idle are exact.
    Ebpf,
    /// Degraded: counts established sockets from the socket table (sock_diag); no in-flight tracking.
    Procfs,
}

impl KernelMode {
    /// The name status reports.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelMode::Ebpf => "ebpf",
            KernelMode::Procfs => "procfs",
        }
    }
}

/// One backend's numbers at one moment. `None` where the source cannot know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSample {
    /// Flow-table entries (eBPF mode).
    pub tracked: Option<u64>,
    pub established: u64,
    /// Established connections whose state the agent does not know: it did not see them
    /// begin (older than the agent) and their traffic has not settled them yet. In procfs
    /// mode every established connection is unknown.
    pub unknown: Option<u64>,
    pub in_flight: Option<u64>,
    pub accepted: Option<u64>,
    pub closed: Option<u64>,
    pub reset_by_client: Option<u64>,
    pub reset_by_server: Option<u64>,
    pub flow_table_full: Option<u64>,
    pub vanished: Option<u64>,
    pub cut_in_flight: Option<u64>,
    /// Time since the last in-flight → idle transition.
    pub since_last_idle: Option<Duration>,
    /// Connections went untracked (no storage could be allocated) and are not yet counted as
    /// unknown from the socket table: the kernel's quiet cannot be trusted meanwhile.
    pub untracked_pending: bool,
    /// The backend's kernel gate, when it has one (eBPF mode).
    pub gate: Option<gate::GateSample>,
    /// Per instance slot (eBPF mode; empty in procfs mode): a handover's two versions, each
    /// counted on its own (docs/handover.md).
    pub instances: Vec<InstanceSample>,
    /// The slot of the instance serving new connections.
    pub serving_instance: u32,
}

/// One instance's (version's) share of a backend's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceSample {
    pub established: u64,
    pub in_flight: u64,
    pub unknown: u64,
    /// Handshakes its listener completed (total).
    pub accepted: u64,
    /// Time since its last in-flight → idle transition.
    pub since_last_idle: Option<Duration>,
}

impl BackendSample {
    /// Connections known to carry nothing: established minus in flight minus unknown.
    pub fn idle(&self) -> Option<u64> {
        self.in_flight.map(|in_flight| {
            self.established
                .saturating_sub(in_flight)
                .saturating_sub(self.unknown.unwrap_or(0))
        })
    }
}

/// A loaded connection source.
pub enum Tracker {
    Ebpf(Box<ebpf::EbpfTracker>),
    Procfs(procfs::ProcfsTracker),
}

impl Tracker {
    /// Loads the chosen source for `config`.
    pub fn start(config: &Config, mode: KernelMode) -> Result<Tracker, TrackerError> {
        Ok(match mode {
            KernelMode::Ebpf => Tracker::Ebpf(Box::new(ebpf::EbpfTracker::start(config)?)),
            KernelMode::Procfs => Tracker::Procfs(procfs::ProcfsTracker::new(config)),
        })
    }

    pub fn mode(&self) -> KernelMode {
        match self {
            Tracker::Ebpf(_) => KernelMode::Ebpf,
            Tracker::Procfs(_) => KernelMode::Procfs,
        }
    }

    /// Current numbers per backend, in config order. O(backends × CPUs) in eBPF mode.
    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.sample(),
            Tracker::Procfs(tracker) => tracker.sample(),
        }
    }

    /// Entries and size (`flow_table_size`) of the table of seeded connections (older than
    /// the agent, or untracked), in eBPF mode. The connections established while the agent
    /// watches live in their sockets' storage, which has no capacity to fill.
    pub fn flow_table(&self) -> Option<(u64, u64)> {
        match self {
            Tracker::Ebpf(tracker) => Some((
                tracker.seeded_entries(),
                u64::from(tracker.flow_table_size()),
            )),
            Tracker::Procfs(_) => None,
        }
    }

    /// Where the kernel programs are attached (eBPF mode).
    pub fn attachments(&self) -> Vec<Attachment> {
        match self {
            Tracker::Ebpf(tracker) => tracker.attachments().to_vec(),
            Tracker::Procfs(_) => Vec::new(),
        }
    }

    /// Which kernel features run (eBPF mode; empty in procfs mode, which loads nothing).
    pub fn features(&self) -> Vec<features::FeatureStatus> {
        match self {
            Tracker::Ebpf(tracker) => tracker.features().to_vec(),
            Tracker::Procfs(_) => Vec::new(),
        }
    }

    /// Closes backend `index`'s gate for at most `deadline`. `Ok(false)`: it has none (or
    /// procfs mode, where there is no gate).
    pub fn close_gate(&mut self, index: usize, deadline: Duration) -> Result<bool, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.close_gate(index, deadline),
            Tracker::Procfs(_) => Ok(false),
        }
    }

    /// Opens backend `index`'s gate. `Ok(false)`: it has none.
    pub fn open_gate(&mut self, index: usize) -> Result<bool, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.open_gate(index),
            Tracker::Procfs(_) => Ok(false),
        }
    }

    /// Writes backend `index`'s steering. `Ok(false)`: procfs mode, which cannot steer.
    pub fn steer(
        &mut self,
        index: usize,
        steering: drain_agent_common::steer::Steering,
    ) -> Result<bool, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.steer(index, steering).map(|()| true),
            Tracker::Procfs(_) => Ok(false),
        }
    }

    /// Puts or takes an instance's listener in the steering map (eBPF mode).
    pub fn steer_socket(
        &mut self,
        port: u16,
        ipv6: bool,
        instance: u32,
        socket: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(), TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.steer_socket(port, ipv6, instance, socket),
            Tracker::Procfs(_) => Ok(()),
        }
    }

    /// The kernel programs' log records (eBPF mode with a gate), once.
    pub fn take_kernel_log(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match self {
            Tracker::Ebpf(tracker) => tracker.take_kernel_log(),
            Tracker::Procfs(_) => None,
        }
    }

    /// Deletes seeded connections (older than the agent) that ended or whose socket is gone
    /// (eBPF mode); returns how many vanished.
    pub fn collect_garbage(&mut self) -> Result<u64, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.collect_garbage(),
            Tracker::Procfs(_) => Ok(0),
        }
    }

    /// Counts connections that went untracked (no storage could be allocated) as unknown, from
    /// the socket table, if any did since the last time (eBPF mode); returns how many.
    pub fn seed_untracked(&mut self) -> Result<usize, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) if tracker.untracked_pending()? => tracker.seed_untracked(),
            _ => Ok(0),
        }
    }

    /// The first half of a collection, without reading the socket table (see
    /// [`ebpf::EbpfTracker::garbage_candidates`]); `None` in procfs mode.
    pub fn garbage_candidates(&self) -> Result<Option<ebpf::GarbageCandidates>, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.garbage_candidates().map(Some),
            Tracker::Procfs(_) => Ok(None),
        }
    }

    /// The second half, with the socket table the caller read meanwhile.
    pub fn remove_garbage(
        &mut self,
        candidates: ebpf::GarbageCandidates,
        live: std::collections::HashSet<u64>,
    ) -> Result<u64, TrackerError> {
        match self {
            Tracker::Ebpf(tracker) => tracker.remove_garbage(candidates, live),
            Tracker::Procfs(_) => Ok(0),
        }
    }
}

/// Why the connection source could not start or be read.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(
        "the eBPF programs could not be loaded ({cause}). drain-agent needs CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON (run it as root, or grant them in the systemd unit) and a \
         kernel with BTF. Where that cannot be had, `drain-agent run --kernel procfs` counts \
         established connections only, without in-flight tracking"
    )]
    Load { cause: String },
    #[error(
        "kernel {kernel} refused the {feature} programs: {reason}. The {feature} needs {needs} \
         (docs/troubleshooting.md#kernels)"
    )]
    Unsupported {
        feature: &'static str,
        needs: &'static str,
        kernel: String,
        reason: String,
    },
    #[error(
        "kernel {found} is older than any kernel drain-agent's programs were tested on (6.1, \
         Debian 12's; docs/troubleshooting.md#kernels). Upgrade the kernel, or run with \
         `--kernel procfs` (established connections only)"
    )]
    KernelTooOld { found: String },
    #[error(
        "no cgroup v2 hierarchy is mounted in this mount namespace (searched {}): drain-agent \
         attaches its sock_ops program to the cgroup-v2 root. Mount one (`mount -t cgroup2 none \
         /sys/fs/cgroup`), and note that `ip netns exec` remounts /sys without it: enter a \
         namespace with `nsenter --net=/run/netns/NAME` instead",
        searched.display()
    )]
    NoCgroup2 { searched: std::path::PathBuf },
    #[error("could not attach the {direction} program to `{interface}`")]
    Attach {
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading {what} failed")]
    Read {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TrackerError {
    /// A load failure, described by its innermost cause (e.g. "Operation not permitted"),
    /// which is what tells the operator what is missing.
    pub fn load(err: impl std::error::Error) -> TrackerError {
        let outer = err.to_string();
        let mut innermost: &dyn std::error::Error = &err;
        while let Some(inner) = innermost.source() {
            innermost = inner;
        }
        // aya repeats its context at every level; the outermost and innermost say it all.
        let innermost = innermost.to_string();
        TrackerError::Load {
            cause: if innermost == outer || outer.contains(&innermost) {
                outer
            } else {
                format!("{outer}: {innermost}")
            },
        }
    }
}
