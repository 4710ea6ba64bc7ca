//! The Debian package an operator installs on an API node: the binary, the systemd unit, an
//! example config and the docs. Built with `dpkg-deb` (on every Debian machine already) by
//! `cargo xtask package`; the fleet lab installs the same file through the Ansible role.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

/// The package's name, as `apt` and `dpkg` know it.
pub const NAME: &str = "drain-agent";
/// Where the package puts the binary (packaged software lives in /usr/bin, not /usr/local).
pub const BINARY: &str = "/usr/bin/drain-agent";
/// Where the package puts the systemd unit (Debian 12's place for packaged units).
pub const UNIT: &str = "/lib/systemd/system/drain-agent.service";
/// Where the docs go.
pub const DOC_DIR: &str = "/usr/share/doc/drain-agent";

/// The repository's root (the tests crate lives one level below it).
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// The agent's version, from agent/Cargo.toml.
pub fn version() -> String {
    let manifest = std::fs::read_to_string(repository().join("agent/Cargo.toml"))
        .expect("read agent/Cargo.toml");
    manifest
        .lines()
        .find_map(|line| {
            let value = line
                .strip_prefix("version")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
        .expect("agent/Cargo.toml has a version")
}

/// `dpkg --print-architecture` (amd64 here).
fn architecture() -> io::Result<String> {
    let out = Command::new("dpkg").arg("--print-architecture").output()?;
    if !out.status.success() {
        return Err(io::Error::other("dpkg --print-architecture failed"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds `drain-agent_VERSION_ARCH.deb` in `out_dir` from the agent binary at `binary` and
/// returns its path.
pub fn build(binary: &Path, out_dir: &Path) -> io::Result<PathBuf> {
    let version = version();
    let arch = architecture()?;
    let staging = out_dir.join(format!("{NAME}-{version}-staging"));
    let _ = std::fs::remove_dir_all(&staging);
    let repo = repository();
    let place = |path: &str| staging.join(path.trim_start_matches('/'));

    install(binary, &place(BINARY), 0o755)?;
    let unit = std::fs::read_to_string(repo.join("deploy/drain-agent.service"))?;
    write(&place(UNIT), &packaged_unit(&unit), 0o644)?;
    let doc = place(DOC_DIR);
    install(&repo.join("README.md"), &doc.join("README.md"), 0o644)?;
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo.join("docs"))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<_>>()?;
    docs.sort();
    for path in docs
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
    {
        install(
            path,
            &doc.join("docs").join(path.file_name().unwrap()),
            0o644,
        )?;
    }
    install(
        &repo.join("deploy/config.example.toml"),
        &doc.join("examples/config.toml"),
        0o644,
    )?;
    write(&doc.join("copyright"), COPYRIGHT, 0o644)?;

    let debian = staging.join("DEBIAN");
    write(
        &debian.join("control"),
        &control(&version, &arch, installed_size_kib(&staging)?),
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("prerm"), PRERM, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;

    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    let out = Command::new("dpkg-deb")
        // gzip: a third larger than xz, but built in a third of the time (the lab builds the
        // package on every run); dpkg and apt read both.
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&staging)
        .arg(&deb)
        .output()?;
    let _ = std::fs::remove_dir_all(&staging);
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "dpkg-deb --build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(deb)
}

/// The unit as shipped: the binary where the package puts it, and a header that says how to
/// start it once the config is written.
pub fn packaged_unit(unit: &str) -> String {
    let body = unit
        .lines()
        .skip_while(|line| line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "# drain-agent on an API node, installed by the drain-agent package. Write\n\
         # /etc/drain-agent/config.toml first (an example: {DOC_DIR}/examples/config.toml),\n\
         # check it with `drain-agent check-config`, then:\n\
         #   systemctl enable --now drain-agent\n{}\n",
        body.replace("/usr/local/bin/drain-agent", BINARY)
    )
}

fn control(version: &str, arch: &str, installed_size_kib: u64) -> String {
    format!(
        "Package: {NAME}
Version: {version}
Architecture: {arch}
Maintainer: drain-agent developers <drain-agent@example.org>
Installed-Size: {installed_size_kib}
Depends: libc6 (>= 2.34), libgcc-s1
Suggests: haproxy
Section: net
Priority: optional
Homepage: https://github.com/drain-agent/drain-agent
Description: eBPF-assisted connection drain agent for API nodes behind HAProxy
 drain-agent runs on each API node. Its kernel programs count, per backend port,
 which connections carry a request in flight and which are idle; it drains the
 node on every load balancer (runtime API and agent-check), restarts the
 service, verifies its health and puts it back in service.
 .
 The unit is installed but not enabled: write /etc/drain-agent/config.toml
 first (see {DOC_DIR}/examples/config.toml).
"
    )
}

/// Debian's copyright file (policy 12.5).
const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: drain-agent
Source: https://github.com/drain-agent/drain-agent

Files: *
Copyright: drain-agent developers
License: MIT or Apache-2.0
 On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.
";

/// The unit is not enabled here: the agent cannot start without a config for this node.
/// An upgrade restarts an agent that is running, on the new binary.
const POSTINST: &str = "#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    if [ -n \"$2\" ]; then
        systemctl try-restart drain-agent.service >/dev/null || true
    fi
fi
";

/// Removing the package stops and disables the agent (`systemctl disable` works without a
/// running systemd, too), so nothing points at a unit that is gone.
const PRERM: &str = "#!/bin/sh
set -e
if [ \"$1\" = remove ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop drain-agent.service >/dev/null 2>&1 || true
    fi
    systemctl disable drain-agent.service >/dev/null 2>&1 || true
fi
";

/// Purging also removes the operation journal and the config the operator wrote.
const POSTRM: &str = "#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ \"$1\" = purge ]; then
    rm -rf /var/lib/drain-agent /etc/drain-agent
fi
";

fn install(from: &Path, to: &Path, mode: u32) -> io::Result<()> {
    let bytes = std::fs::read(from)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", from.display())))?;
    write_bytes(to, &bytes, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> io::Result<()> {
    write_bytes(to, text.as_bytes(), mode)
}

fn write_bytes(to: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(to.parent().expect("a file in a folder"))?;
    std::fs::write(to, bytes)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
}

/// What the files take on disk, in KiB (the `Installed-Size` field).
fn installed_size_kib(dir: &Path) -> io::Result<u64> {
    fn bytes(dir: &Path) -> io::Result<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            total += if entry.file_type()?.is_dir() {
                bytes(&entry.path())?
            } else {
                entry.metadata()?.len()
            };
        }
        Ok(total)
    }
    Ok(bytes(dir)?.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary_and_says_how_to_start_it() {
        let unit =
            std::fs::read_to_string(repository().join("deploy/drain-agent.service")).unwrap();
        let packaged = packaged_unit(&unit);
        assert!(!packaged.contains("/usr/local/bin"), "{packaged}");
        assert!(packaged.contains(&format!(
            "ExecStart={BINARY} run --config /etc/drain-agent/config.toml"
        )));
        assert!(packaged.contains(&format!("ExecStartPre={BINARY} check-config")));
        assert!(
            packaged
                .starts_with("# drain-agent on an API node, installed by the drain-agent package")
        );
        assert!(packaged.contains("\n[Unit]\n") && packaged.contains("\n[Install]\n"));
    }

    #[test]
    fn the_version_is_the_agents() {
        let version = version();
        assert!(
            version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
            "{version}"
        );
    }
}
