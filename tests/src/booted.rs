//! API nodes that boot systemd: a Debian 12 root file system, built once with mmdebstrap from
//! Debian's packages and cached, booted per node by `systemd-nspawn -b` inside the node's
//! network namespace. systemd is PID 1; sshd and the lab's API (gunicorn, `lab-api.service`)
//! are its units. The agent arrives only by the Ansible role's `apt` of the `.deb` and runs
//! under the shipped unit, unchanged; a cycle restarts the API with `systemd_unit`.
//!
//! What a container needs from the host (docs/fleet.md#booted-nodes): nspawn's own seccomp
//! filter refuses `bpf()` and `pidfd_getfd()` to the container's services unless allowed
//! (`--system-call-filter`), and the agent needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and
//! CAP_SYS_PTRACE in the container's bounding set (`--capability=all`). The agent attaches its
//! programs at the root of the container's cgroup namespace: its own node's sockets only.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Process,
    topology::{API_PORT, Host},
};

/// Debian's packages in a node's root file system: systemd as PID 1, sshd and Python for
/// Ansible (python3-apt for its `apt` module), gunicorn for the API.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "gunicorn",
    "iproute2",
    "procps",
];
/// The suite the root file system comes from.
const SUITE: &str = "bookworm";
/// The API's unit in every node.
pub const API_UNIT: &str = "lab-api.service";
/// Where the lab's API (tests/app) is bound into a node, read-only.
const APP_IN_NODE: &str = "/opt/lab-api";
/// Where the node's state directory (its API version files) is bound into the node.
pub const STATE_IN_NODE: &str = "/var/lib/lab-api";
/// The rollback in every node: a oneshot unit that starts the version that ran before the
/// last restart again. A unit, not a script the agent runs: the agent's commands inherit its
/// sandbox (`ProtectSystem=strict`), where the version file is read-only.
pub const ROLLBACK_UNIT: &str = "lab-api-rollback.service";
/// How long a node may take to boot to `running`.
const BOOT_DEADLINE: Duration = Duration::from_secs(60);

/// The root file system's tarball under `cache` (target/nodes), built once with mmdebstrap;
/// a different package list builds another.
pub fn rootfs(cache: &Path) -> Result<PathBuf, String> {
    let key = format!("{SUITE}-{:016x}", fnv1a(&PACKAGES.join(",")));
    let tarball = cache.join(format!("rootfs-{key}.tar"));
    if tarball.exists() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(cache).map_err(|err| format!("{}: {err}", cache.display()))?;
    let partial = tarball.with_extension("tar.partial");
    let out = Command::new("mmdebstrap")
        .args(["--variant=apt", "--format=tar", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&partial)
        .arg("http://deb.debian.org/debian")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("mmdebstrap (cargo xtask setup installs it): {err}"))?;
    if !out.status.success() {
        return Err(format!(
            "mmdebstrap {SUITE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::rename(&partial, &tarball).map_err(|err| err.to_string())?;
    Ok(tarball)
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A booted node: its container, powered off on drop.
pub struct BootedNode {
    pub name: String,
    nspawn: Process,
    /// PID 1 of the container, as the host sees it.
    leader: u32,
}

/// What a node is given at boot.
pub struct NodeSetup<'a> {
    /// The root file system's tarball ([`rootfs`]).
    pub rootfs: &'a Path,
    /// Where the node's root is unpacked (removed with the run's directory).
    pub root: PathBuf,
    /// The controller's public key (root may log in with it).
    pub authorized_key: &'a str,
    /// The node's SSH host key pair (private key path; `.pub` beside it).
    pub host_key: &'a Path,
    /// The version the API starts on.
    pub version: &'a str,
}

impl BootedNode {
    /// Unpacks the root file system for `host`, writes its hostname, SSH keys and the API's
    /// unit, boots it in the host's network namespace and waits until systemd says `running`
    /// and the API answers.
    pub fn boot(host: &Host, setup: &NodeSetup) -> Result<BootedNode, String> {
        let root = &setup.root;
        std::fs::create_dir_all(root).map_err(|err| format!("{}: {err}", root.display()))?;
        let out = Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-xf")
            .arg(setup.rootfs)
            .output()
            .map_err(|err| format!("tar: {err}"))?;
        if !out.status.success() {
            return Err(format!(
                "unpack {}: {}",
                setup.rootfs.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        write_node_files(host, setup)?;
        std::fs::write(host.dir.join("version"), setup.version).map_err(|err| err.to_string())?;
        let console = std::fs::File::create(host.dir.join("console.log"))
            .map_err(|err| format!("console.log: {err}"))?;
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("app");
        let mut command = Command::new("systemd-nspawn");
        command
            .arg("--quiet")
            .arg("--boot")
            .arg(format!("--directory={}", root.display()))
            .arg(format!("--machine={}", host.name))
            // No machined on the host to register with, no unit of the caller's to join.
            .args(["--register=no", "--keep-unit"])
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                host.netns.name()
            ))
            // nspawn's seccomp filter refuses these to the container unless allowed.
            .arg("--system-call-filter=bpf pidfd_getfd pidfd_open")
            .arg("--capability=all")
            .arg("--console=passive")
            .arg(format!("--bind-ro={}:{APP_IN_NODE}", app.display()))
            // The node's state (its API version files), also read by the harness.
            .arg(format!("--bind={}:{STATE_IN_NODE}", host.dir.display()))
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|err| err.to_string())?)
            .stderr(console);
        let nspawn = Process::spawn(&format!("systemd-nspawn {}", host.name), &mut command);
        let mut node = BootedNode {
            name: host.name.clone(),
            nspawn,
            leader: 0,
        };
        node.leader = node.find_leader()?;
        node.wait_running()?;
        Ok(node)
    }

    /// The container's PID 1: the nspawn process's child.
    fn find_leader(&mut self) -> Result<u32, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let pid = self.nspawn.pid();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(child) = children.split_whitespace().next() {
                return child.parse().map_err(|_| format!("child pid {child}"));
            }
            if !self.nspawn.running() {
                return Err(format!("systemd-nspawn for {} exited at start", self.name));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: the container did not start", self.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_running(&self) -> Result<(), String> {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            let state = self.run(&["systemctl", "is-system-running"]).1;
            let state = state.trim();
            if state == "running" {
                break;
            }
            if state == "degraded" {
                let failed = self.run(&["systemctl", "--failed", "--no-legend"]).1;
                return Err(format!("{} booted degraded: {}", self.name, failed.trim()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not boot within {BOOT_DEADLINE:?} (systemd: {state})",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.api_answers() {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: {API_UNIT} does not answer: {}",
                    self.name,
                    self.run(&["systemctl", "status", "--no-pager", API_UNIT]).1
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn api_answers(&self) -> bool {
        let probe = format!(
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{API_PORT}/healthz', timeout=2)"
        );
        self.run(&["python3", "-c", &probe]).0
    }

    /// Runs `argv` inside the node (every namespace of its PID 1); success and stdout.
    pub fn run(&self, argv: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--target={}", self.leader))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--",
            ])
            .args(argv)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ),
            Err(err) => (false, err.to_string()),
        }
    }

    /// The command name of the node's PID 1 (`systemd` when it booted).
    pub fn pid1(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.leader))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// `systemctl is-active UNIT` in the node.
    pub fn unit_state(&self, unit: &str) -> String {
        self.run(&["systemctl", "is-active", unit])
            .1
            .trim()
            .to_string()
    }

    /// When systemd last started the unit's main process (monotonic µs; 0 if never).
    pub fn unit_started_us(&self, unit: &str) -> u64 {
        self.run(&[
            "systemctl",
            "show",
            "--property=ExecMainStartTimestampMonotonic",
            "--value",
            unit,
        ])
        .1
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// The installed version of a package (`dpkg-query`), if installed.
    pub fn package_version(&self, package: &str) -> Option<String> {
        let (ok, version) = self.run(&["dpkg-query", "-W", "-f=${Version}", package]);
        (ok && !version.is_empty()).then_some(version)
    }

    /// The unit's journal, for the run's results.
    pub fn journal(&self, unit: &str) -> String {
        self.run(&["journalctl", "--no-pager", "-o", "short-iso", "-u", unit])
            .1
    }
}

impl Drop for BootedNode {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to power the container off; PID 1's SIGKILL ends whatever is
        // left (every process of the container's PID namespace goes with it).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.nspawn.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.nspawn.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.leader != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The node's hostname, SSH keys and the API's unit, written into its root.
fn write_node_files(host: &Host, setup: &NodeSetup) -> Result<(), String> {
    let root = &setup.root;
    let write = |path: &str, content: &str, mode: u32| -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = root.join(path.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|err| format!("{}: {err}", parent.display()))?;
        }
        std::fs::write(&path, content).map_err(|err| format!("{}: {err}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|err| format!("{}: {err}", path.display()))
    };
    write("/etc/hostname", &format!("{}\n", host.name), 0o644)?;
    // Every node its own host key (the tarball's, made by the package, would be shared).
    for entry in std::fs::read_dir(root.join("etc/ssh")).map_err(|err| err.to_string())? {
        let path = entry.map_err(|err| err.to_string())?.path();
        if path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("ssh_host_"))
        {
            std::fs::remove_file(&path).map_err(|err| err.to_string())?;
        }
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))
    };
    write(
        "/etc/ssh/ssh_host_ed25519_key",
        &read(setup.host_key)?,
        0o600,
    )?;
    write(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        &read(&setup.host_key.with_extension("pub"))?,
        0o644,
    )?;
    write(
        "/etc/ssh/sshd_config.d/lab.conf",
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nX11Forwarding no\n",
        0o644,
    )?;
    write("/root/.ssh/authorized_keys", setup.authorized_key, 0o600)?;
    let dir = STATE_IN_NODE;
    // The lab's API: the version in the node's version file, started by systemd; the version
    // it replaces is kept for the rollback. SIGTERM is gunicorn's graceful stop.
    write(
        &format!("/etc/systemd/system/{API_UNIT}"),
        &format!(
            "[Unit]
Description=The lab's API (gunicorn)
After=network.target

[Service]
ExecStartPre=/bin/sh -c 'if [ -f {dir}/running-version ]; then cp {dir}/running-version {dir}/previous-version; fi'
ExecStart=/bin/sh -c 'v=$(cat {dir}/version 2>/dev/null || echo 1.0); echo \"$v\" > {dir}/running-version; \
API_VERSION=$v exec /usr/bin/python3 -m gunicorn --worker-class gthread --workers 2 --threads 32 \
--keep-alive 300 --graceful-timeout 30 --backlog 4096 --reuse-port --bind [::]:{API_PORT} \
--chdir {APP_IN_NODE} api:app'
KillSignal=SIGTERM
TimeoutStopSec=40
Environment=PYTHONDONTWRITEBYTECODE=1

[Install]
WantedBy=multi-user.target
"
        ),
        0o644,
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).map_err(|err| err.to_string())?;
    let link = wants.join(API_UNIT);
    if !link.exists() {
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{API_UNIT}"), &link)
            .map_err(|err| err.to_string())?;
    }
    write(
        &format!("/etc/systemd/system/{ROLLBACK_UNIT}"),
        &format!(
            "[Unit]
Description=The lab's API: the version that ran before the last restart, again

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'if [ -f {dir}/previous-version ]; then cp {dir}/previous-version {dir}/version; fi'
ExecStart=/bin/systemctl restart {API_UNIT}
"
        ),
        0o644,
    )?;
    Ok(())
}
