//! What a kernel program costs per packet, against an empty program of the same type that
//! runs at the same hook, on the same packets, in the same window: the kernel's own run-time
//! statistics (`BPF_ENABLE_STATS`, `run_time_ns` / `run_cnt` of `bpf_prog_info`).
//!
//! The empty programs are the bench's own tiny object, assembled here with LLVM's `llvm-mc`
//! (installed by `cargo xtask setup` for bpf-linker): they are never part of the shipped
//! object. The statistics add their own clock reads to every program alike, so only the
//! ratio of two programs measured together means anything.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Xdp, XdpMode, loaded_programs},
};

/// Two empty `cgroup_skb` programs, one per direction (1: let the packet through, as the
/// agent's do), and an empty XDP program (`XDP_PASS`).
const BASELINE_ASSEMBLY: &str = r#"
	.section	cgroup_skb/ingress,"ax",@progbits
	.globl	empty_skb_ingress
	.type	empty_skb_ingress,@function
empty_skb_ingress:
	r0 = 1
	exit
.Lempty_skb_ingress_end:
	.size	empty_skb_ingress, .Lempty_skb_ingress_end-empty_skb_ingress

	.section	cgroup_skb/egress,"ax",@progbits
	.globl	empty_skb_egress
	.type	empty_skb_egress,@function
empty_skb_egress:
	r0 = 1
	exit
.Lempty_skb_egress_end:
	.size	empty_skb_egress, .Lempty_skb_egress_end-empty_skb_egress

	.section	xdp,"ax",@progbits
	.globl	empty_xdp
	.type	empty_xdp,@function
empty_xdp:
	r0 = 2
	exit
.Lempty_xdp_end:
	.size	empty_xdp, .Lempty_xdp_end-empty_xdp

	.section	license,"aw",@progbits
	.globl	LICENSE
LICENSE:
	.asciz	"GPL"
	.size	LICENSE, 4
"#;

/// The empty `cgroup_skb` programs' names in the bench's object: one per direction, so that
/// each direction has its own statistics.
pub const EMPTY_SKB_INGRESS: &str = "empty_skb_ingress";
pub const EMPTY_SKB_EGRESS: &str = "empty_skb_egress";
/// The empty XDP program's name in the bench's object.
pub const EMPTY_XDP: &str = "empty_xdp";

/// The bench's empty programs, loaded (and attached where asked). Dropping it detaches them.
pub struct Baseline {
    ebpf: Ebpf,
}

impl Baseline {
    /// Assembles the empty programs into `dir` and loads them.
    pub fn load(dir: &Path) -> Result<Baseline> {
        let source = dir.join("baseline.s");
        let object = dir.join("baseline.o");
        std::fs::write(&source, BASELINE_ASSEMBLY)?;
        let llvm_mc = llvm_mc();
        let status = Command::new(&llvm_mc)
            .args(["-triple", "bpfel", "-filetype=obj", "-o"])
            .arg(&object)
            .arg(&source)
            .status()
            .with_context(|| format!("starting {} (run `cargo xtask setup`)", llvm_mc.display()))?;
        if !status.success() {
            bail!(
                "{} could not assemble {}",
                llvm_mc.display(),
                source.display()
            );
        }
        let bytes = std::fs::read(&object)?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the bench's empty programs")?;
        for name in [EMPTY_SKB_INGRESS, EMPTY_SKB_EGRESS] {
            let skb: &mut CgroupSkb = program(&mut ebpf, name)?.try_into()?;
            skb.load()?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, EMPTY_XDP)?.try_into()?;
        xdp.load()?;
        Ok(Baseline { ebpf })
    }

    /// Attaches the empty `cgroup_skb` programs to the cgroup-v2 root in both directions, as
    /// links after whatever is attached there (the agent's packet programs): every packet of
    /// every socket runs both.
    pub fn attach_cgroup_skb(&mut self, cgroup_root: &Path) -> Result<()> {
        let cgroup = std::fs::File::open(cgroup_root)
            .with_context(|| format!("opening the cgroup {}", cgroup_root.display()))?;
        for (name, direction) in [
            (EMPTY_SKB_INGRESS, CgroupSkbAttachType::Ingress),
            (EMPTY_SKB_EGRESS, CgroupSkbAttachType::Egress),
        ] {
            let skb: &mut CgroupSkb = program(&mut self.ebpf, name)?.try_into()?;
            skb.attach(&cgroup, direction, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "attaching the empty cgroup_skb program to {}",
                        cgroup_root.display()
                    )
                })?;
        }
        Ok(())
    }

    /// Attaches the empty XDP program to `interface` (of the calling thread's network
    /// namespace). An interface runs one XDP program per mode, so the program measured against
    /// it must run on the same traffic in another window, not alongside.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        let xdp: &mut Xdp = program(&mut self.ebpf, EMPTY_XDP)?.try_into()?;
        xdp.attach(interface, mode)
            .with_context(|| format!("attaching the empty XDP program to {interface}"))?;
        Ok(())
    }

    /// The kernel's id of one of the empty programs.
    pub fn id(&self, name: &str) -> Result<u32> {
        let program = self
            .ebpf
            .program(name)
            .with_context(|| format!("{name} missing from the bench's object"))?;
        Ok(program.info()?.id())
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("{name} missing from the bench's object"))
}

fn llvm_mc() -> PathBuf {
    let installed = Path::new(crate::setup::LLVM_PREFIX).join("bin/llvm-mc");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("llvm-mc")
    }
}

/// The kernel's run-time statistics, on while this lives (`BPF_ENABLE_STATS`: they cost a
/// clock read per run, so the kernel keeps them off by default).
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<RunTimeStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF run-time statistics")?;
        Ok(RunTimeStats { _enabled: fd })
    }

    /// Total run time and run count of each program, in the order of `ids`.
    pub fn read(&self, ids: &[u32]) -> Result<Vec<Runs>> {
        let mut found = vec![None; ids.len()];
        for info in loaded_programs() {
            let info = info.context("listing loaded BPF programs")?;
            if let Some(slot) = ids.iter().position(|&id| id == info.id()) {
                found[slot] = Some(Runs {
                    nanoseconds: info.run_time().as_nanos() as u64,
                    count: info.run_count(),
                });
            }
        }
        ids.iter()
            .zip(found)
            .map(|(id, runs)| runs.with_context(|| format!("BPF program {id} is not loaded")))
            .collect()
    }
}

/// A program's accumulated runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Runs {
    pub nanoseconds: u64,
    pub count: u64,
}

impl Runs {
    /// What ran between `before` and `self`.
    pub fn since(self, before: Runs) -> Runs {
        Runs {
            nanoseconds: self.nanoseconds.saturating_sub(before.nanoseconds),
            count: self.count.saturating_sub(before.count),
        }
    }

    /// Runs added up (both directions of a program pair).
    pub fn plus(self, other: Runs) -> Runs {
        Runs {
            nanoseconds: self.nanoseconds + other.nanoseconds,
            count: self.count + other.count,
        }
    }

    pub fn per_run_ns(self) -> f64 {
        self.nanoseconds as f64 / self.count.max(1) as f64
    }
}

/// Runs `traffic` and returns what each program in `ids` ran meanwhile.
pub fn during(
    stats: &RunTimeStats,
    ids: &[u32],
    traffic: impl FnOnce() -> Result<()>,
) -> Result<Vec<Runs>> {
    let before = stats.read(ids)?;
    traffic()?;
    let after = stats.read(ids)?;
    Ok(after
        .into_iter()
        .zip(before)
        .map(|(a, b)| a.since(b))
        .collect())
}
