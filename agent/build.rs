//! Builds the eBPF object (agent-ebpf) with the nightly toolchain and bpf-linker, so that one
//! `cargo build` produces a binary with the kernel programs embedded.
use std::path::PathBuf;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [Package {
            name: "drain-agent-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
