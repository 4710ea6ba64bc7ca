//! Idempotent machine set-up. Every task calls [`ensure`] first, so the README's commands work
//! on a fresh machine. What is known to work here is recorded in ../shared/TOOLCHAIN.md.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// Debian packages the build and the tests use.
const DEBIAN_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (the nightly's LLVM); its llvm-mc assembles the
    // bench's empty baseline programs.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    // Test hosts and ground truth.
    "iproute2",
    "bpftool",
    "util-linux",
    "procps",
    "curl",
    "socat",
    // The real HTTP API server the tests drive, and the load balancer in front of it.
    "gunicorn",
    "python3-gunicorn",
    "haproxy",
    "keepalived",
    // The load-balancer pair's connection hand-off across a VIP move (tests/src/tier.rs).
    "nftables",
    // Scrapes the agent's metrics in a test; verifies the systemd unit.
    "prometheus",
    "systemd",
    // The kernel matrix: Debian's kernels booted under software emulation from an initramfs
    // of busybox, the release binary and the smoke suite; their modules are xz-compressed.
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    // Turns a veth's VLAN offload off, so that a test's tags travel inside the frames.
    "ethtool",
    // Records the agent's system calls, checked against the unit's SystemCallFilter.
    "strace",
    // The fleet: the role and playbooks run by Debian's Ansible (ansible-core 2.14 in
    // Debian 12, ansible-lint 6.13) over SSH to sshd in each API node's namespace.
    "ansible-core",
    "ansible-lint",
    "openssh-server",
    "openssh-client",
    // The fleet's API nodes boot systemd: a Debian root file system made once by mmdebstrap,
    // booted per node by systemd-nspawn.
    "mmdebstrap",
    "systemd-container",
];

/// The third-party load generator (per-request status and error accounting, JSON output).
const OHA_VERSION: &str = "1.16.0";

const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Installs whatever is missing; a no-op on a machine that has everything.
pub fn ensure() -> Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    oha()?;
    Ok(())
}

fn oha() -> Result<()> {
    let version = Command::new(drain_agent_tests::load::oha_binary())
        .arg("--version")
        .output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(OHA_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: installing oha {OHA_VERSION} (the load generator; about 5 minutes)");
    run(Command::new("cargo").args(["install", "--locked", "oha", "--version", OHA_VERSION]))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}. Run `cargo xtask setup` as root, or install them with \
             apt-get",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (builds the eBPF crate)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "clippy",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (needed by -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !components.lines().any(|line| line.starts_with("clippy")) {
        run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        {
            return Ok(());
        }
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path))
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether xtask runs as root (apt-get, network namespaces).
pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}
