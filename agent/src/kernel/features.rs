//! What this kernel can run, found by loading the programs, not by reading its version: the
//! accounting (the `sock_ops` and `cgroup_skb` programs) is required; the gate (XDP) and the
//! handover's steering (`sk_lookup`) are features a backend may configure, refused by name
//! where the kernel's verifier refuses their program, while the rest runs.

use aya::{
    EbpfLoader,
    programs::{Program, ProgramError},
};
use drain_agent_common::names;
use serde::{Deserialize, Serialize};

use super::{TrackerError, ebpf::EBPF_OBJECT};

/// A part of the kernel side that loads (or not) on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// In-flight and idle per connection: every backend needs it.
    Accounting,
    /// The XDP gate (`gate` in a backend).
    Gate,
    /// The handover's `sk_lookup` steering (`handover` in a backend).
    Handover,
}

impl Feature {
    pub const ALL: [Feature; 3] = [Feature::Accounting, Feature::Gate, Feature::Handover];

    /// The name status, metrics and messages use.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Accounting => "accounting",
            Feature::Gate => "gate",
            Feature::Handover => "handover",
        }
    }

    /// The programs of the object that make it up.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Feature::Accounting => &[
                names::SOCK_OPS_PROGRAM,
                names::INGRESS_PROGRAM,
                names::EGRESS_PROGRAM,
            ],
            Feature::Gate => &[names::GATE_PROGRAM],
            Feature::Handover => &[names::STEER_PROGRAM],
        }
    }

    /// What the kernel must offer, with the release that brought it (docs/troubleshooting.md).
    pub fn needs(self) -> &'static str {
        match self {
            Feature::Accounting => {
                "sock_ops and cgroup_skb programs with socket storage, bpf_get_netns_cookie in \
                 sock_ops (Linux 5.15) and BPF atomics (5.12); tested on 6.1 and later"
            }
            Feature::Gate => "XDP programs attached as links (Linux 5.9)",
            Feature::Handover => "sk_lookup programs with a SOCKHASH (Linux 5.9)",
        }
    }
}

/// One feature on this kernel, as status and metrics report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeatureStatus {
    pub feature: String,
    pub state: FeatureState,
    /// Why it is unsupported: the verifier's last lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeatureState {
    /// Loaded and attached.
    Active,
    /// Configured, but the kernel refused its program: not attached.
    Unsupported,
    /// No backend configures it.
    NotConfigured,
}

impl FeatureState {
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureState::Active => "active",
            FeatureState::Unsupported => "unsupported",
            FeatureState::NotConfigured => "not_configured",
        }
    }
}

/// Per feature, `Ok` or the kernel's reason for refusing it.
pub type Probed = Vec<(Feature, Result<(), String>)>;

/// Loads every program of the object and discards it: per feature, `Ok` or the kernel's
/// reason (the verifier's last lines). Needs what `run` needs (CAP_BPF or root).
pub fn probe() -> Result<Probed, TrackerError> {
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .map_err(TrackerError::load)?;
    Ok(Feature::ALL
        .into_iter()
        .map(|feature| {
            let loaded = feature.programs().iter().try_for_each(|&name| {
                let program = ebpf
                    .program_mut(name)
                    .ok_or_else(|| format!("program {name} missing from the eBPF object"))?;
                match program {
                    Program::SockOps(program) => program.load(),
                    Program::CgroupSkb(program) => program.load(),
                    Program::Xdp(program) => program.load(),
                    Program::SkLookup(program) => program.load(),
                    _ => return Err(format!("program {name} is of an unexpected type")),
                }
                .map_err(|err| refusal(&err))
            });
            (feature, loaded)
        })
        .collect())
}

/// A program load's failure in a line or a few: the system call's error and, when the
/// verifier refused it, the verifier's last lines (where it names what it refused).
fn refusal(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with("processed "))
                .collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
            if tail.is_empty() {
                io_error.to_string()
            } else {
                format!("{io_error}; the verifier said: {tail}")
            }
        }
        other => other.to_string(),
    }
}

/// Whether a load failure is the verifier refusing the program (this kernel lacks something
/// it uses), rather than a missing permission.
fn refused_by_verifier(err: &ProgramError) -> bool {
    matches!(err, ProgramError::LoadError { io_error, .. }
        if io_error.raw_os_error() != Some(libc::EPERM))
}

/// A program load's failure as the error `run` reports: by feature when the verifier refused
/// the program, as a load failure (permissions, BTF) otherwise.
pub fn load_failure(feature: Feature, err: ProgramError) -> TrackerError {
    if refused_by_verifier(&err) {
        TrackerError::Unsupported {
            feature: feature.name(),
            needs: feature.needs(),
            kernel: kernel_release(),
            reason: refusal(&err),
        }
    } else {
        TrackerError::load(err)
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
