//! The kernel matrix in the suite: Debian 12's 6.1 and bookworm-backports' 6.12 booted under
//! QEMU, and the running kernel, each running the smoke suite (`cargo xtask kernels` prints
//! the same table). The floor docs/troubleshooting.md claims is the lowest kernel here.

use drain_agent_tests::{agent_binary, kernels, require_root};

#[test]
fn every_listed_kernel_loads_the_programs_counts_idle_and_in_flight_and_holds_a_drain() {
    require_root();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let smoke = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kernel-smoke"));
    let rows = kernels::run_matrix(&root, &agent_binary(), &smoke);
    let table = kernels::table(&rows);
    println!("{table}");
    assert_eq!(
        rows.len(),
        kernels::KERNELS.len() + 1,
        "every listed kernel and the running one have a row:\n{table}"
    );
    for row in &rows {
        assert!(row.passed(), "kernel {} failed:\n{table}", row.kernel);
        // Every kernel of the matrix runs every feature; a refusal would be a regression
        // of the floor the docs claim.
        for feature in ["gate", "handover"] {
            assert_eq!(
                row.result(feature),
                Some("pass"),
                "{feature} on {}:\n{table}",
                row.kernel
            );
        }
    }
    let floor = rows
        .iter()
        .filter_map(|row| release_of(&row.release))
        .min()
        .expect("a release per row");
    assert_eq!(
        floor,
        (6, 1),
        "the lowest kernel that passed is the floor the docs claim (MIN_KERNEL 6.1):\n{table}"
    );
}

/// "6.1.0-57-cloud-amd64" → (6, 1).
fn release_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
