//! The kernel matrix (`cargo xtask kernels`, and a test of the suite): Debian's own kernels,
//! fetched from Debian's archive with apt, booted under QEMU (software emulation) from an
//! initramfs that holds the release binary, the smoke suite (`kernel-smoke`), busybox, `ip`
//! and the few modules the suite needs; plus the running kernel, where the same suite runs in
//! a network namespace of its own. docs/troubleshooting.md#kernels states what passed.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A kernel to boot: Debian's cloud flavour from one suite, named by its meta package (the
/// suite's newest build of that series).
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What the table calls it.
    pub name: &'static str,
    /// The Debian suite its package comes from.
    pub suite: &'static str,
    /// Which distributions run this series.
    pub covers: &'static str,
}

/// The kernels operators run, oldest first. Debian 12's 6.1 is the floor the docs claim.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "debian12-6.1",
        suite: "bookworm-security",
        covers: "Debian 12",
    },
    Kernel {
        name: "debian12-backports-6.12",
        suite: "bookworm-backports",
        covers: "Debian 13, RHEL 10, Debian 12 backports",
    },
];

/// Modules of Debian's kernels the suite needs (the socket table, the client's veth), in
/// load order; the initramfs has no modprobe to load them on demand.
const MODULES: &[&str] = &[
    "net/ipv4/inet_diag.ko",
    "net/ipv4/tcp_diag.ko",
    "drivers/net/veth.ko",
];

/// One check of one kernel.
#[derive(Debug, Clone)]
pub struct Check {
    pub check: String,
    /// "pass", "fail", or "refused" (a feature the kernel cannot run, refused by name).
    pub result: String,
    pub detail: String,
}

/// One kernel's row.
#[derive(Debug, Clone)]
pub struct Row {
    pub kernel: String,
    pub release: String,
    pub covers: String,
    pub checks: Vec<Check>,
    /// Why the suite could not run (fetch, boot, no output), if it could not.
    pub error: Option<String>,
    /// Where the guest kernel oopsed, if it did (its RIP and call trace).
    pub oops: Option<String>,
    pub seconds: f64,
}

/// The checks every kernel must show (a feature's own check may instead be `refused`).
pub const REQUIRED: &[&str] = &["load", "idle", "in_flight", "drain", "resume", "status"];

impl Row {
    /// Every required check passed; the gate and the handover passed, or were refused by name
    /// where the kernel cannot run them.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.oops.is_none()
            && REQUIRED
                .iter()
                .all(|name| self.result(name) == Some("pass"))
            && ["gate", "handover"]
                .iter()
                .all(|name| matches!(self.result(name), Some("pass" | "refused")))
            && !self.checks.iter().any(|check| check.result == "fail")
    }

    pub fn result(&self, check: &str) -> Option<&str> {
        self.checks
            .iter()
            .find(|c| c.check == check)
            .map(|c| c.result.as_str())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "release": self.release,
            "covers": self.covers,
            "passed": self.passed(),
            "error": self.error,
            "oops": self.oops,
            "seconds": self.seconds,
            "checks": self.checks.iter().map(|check| json!({
                "check": check.check, "result": check.result, "detail": check.detail,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The matrix's table: kernel × check.
pub fn table(rows: &[Row]) -> String {
    let columns = [
        "load",
        "idle",
        "in_flight",
        "drain",
        "gate",
        "handover",
        "resume",
        "status",
    ];
    let mut out = format!("{:<26} {:<28}", "kernel", "release");
    for column in columns {
        out.push_str(&format!(" {column:<9}"));
    }
    out.push_str(" verdict\n");
    for row in rows {
        out.push_str(&format!("{:<26} {:<28}", row.kernel, row.release));
        for column in columns {
            out.push_str(&format!(" {:<9}", row.result(column).unwrap_or("-")));
        }
        out.push_str(if row.passed() { " PASS\n" } else { " FAIL\n" });
        if let Some(error) = &row.error {
            out.push_str(&format!("  error: {error}\n"));
        }
        if let Some(oops) = &row.oops {
            out.push_str(&format!("  kernel oops: {oops}\n"));
        }
        for check in row
            .checks
            .iter()
            .filter(|check| check.result != "pass" || check.check.starts_with("feature"))
        {
            out.push_str(&format!(
                "  {}: {} — {}\n",
                check.check, check.result, check.detail
            ));
        }
    }
    out
}

/// Where the matrix keeps what it fetched and built: `target/kernels`.
pub fn cache_dir(root: &Path) -> PathBuf {
    root.join("target/kernels")
}

/// Runs the suite on every listed kernel and on the running one.
pub fn run_matrix(root: &Path, agent: &Path, smoke: &Path) -> Vec<Row> {
    let cache = cache_dir(root);
    let mut rows = Vec::new();
    for kernel in KERNELS {
        let started = Instant::now();
        let row = match boot(&cache, kernel, agent, smoke) {
            Ok(row) => row,
            Err(error) => Row {
                kernel: kernel.name.to_string(),
                release: String::new(),
                covers: kernel.covers.to_string(),
                checks: Vec::new(),
                error: Some(error),
                oops: None,
                seconds: 0.0,
            },
        };
        rows.push(Row {
            seconds: started.elapsed().as_secs_f64(),
            ..row
        });
    }
    let started = Instant::now();
    let mut host = on_running_kernel(agent, smoke);
    host.seconds = started.elapsed().as_secs_f64();
    rows.push(host);
    rows
}

/// The suite on the running kernel, in a network namespace of its own (`unshare --net`, which
/// keeps the cgroup-v2 mount that `ip netns exec` would hide).
pub fn on_running_kernel(agent: &Path, smoke: &Path) -> Row {
    let dir = tempdir("kernel-smoke-host");
    let prefix = format!("ks{}", std::process::id() % 100_000);
    let out = Command::new("unshare")
        .arg("--net")
        .arg(smoke)
        .args(["run", "--prefix", &prefix, "--agent"])
        .arg(agent)
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .output();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut row = Row {
        kernel: "running".to_string(),
        release,
        covers: "this machine".to_string(),
        checks: Vec::new(),
        error: None,
        oops: None,
        seconds: 0.0,
    };
    match out {
        Ok(out) => {
            row.checks = parse_checks(&String::from_utf8_lossy(&out.stdout));
            if row.checks.is_empty() {
                row.error = Some(format!(
                    "the smoke suite printed nothing: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Err(err) => row.error = Some(format!("unshare: {err}")),
    }
    let _ = std::fs::remove_dir_all(&dir);
    row
}

/// The `KERNEL-SMOKE {json}` lines of a console or an output.
pub fn parse_checks(output: &str) -> Vec<Check> {
    output
        .lines()
        .filter_map(|line| {
            let at = line.find("KERNEL-SMOKE ")?;
            let value: Value =
                serde_json::from_str(line[at + "KERNEL-SMOKE ".len()..].trim()).ok()?;
            Some(Check {
                check: value["check"].as_str()?.to_string(),
                result: value["result"].as_str()?.to_string(),
                detail: value["detail"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Fetches `kernel`, builds its initramfs and boots it; the row of what the suite printed.
/// A guest kernel that oopses outside BPF code (emulation faults, see the CPU model below) is
/// booted once more, and the row says so.
fn boot(cache: &Path, kernel: &Kernel, agent: &Path, smoke: &Path) -> Result<Row, String> {
    let (vmlinuz, modules, release) = fetch(cache, kernel)?;
    let initramfs = initramfs(cache, kernel, &modules, agent, smoke)?;
    let mut row = boot_once(cache, kernel, &vmlinuz, &initramfs, &release)?;
    if let Some(oops) = row.oops.clone()
        && !oops.contains("bpf")
    {
        row = boot_once(cache, kernel, &vmlinuz, &initramfs, &release)?;
        row.checks.push(Check {
            check: "retried".to_string(),
            result: "note".to_string(),
            detail: format!("the first boot's kernel oopsed outside BPF: {oops}"),
        });
    }
    Ok(row)
}

fn boot_once(
    cache: &Path,
    kernel: &Kernel,
    vmlinuz: &Path,
    initramfs: &Path,
    release: &str,
) -> Result<Row, String> {
    let console = cache.join(format!("{}.console", kernel.name));
    let log =
        std::fs::File::create(&console).map_err(|err| format!("{}: {err}", console.display()))?;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            // A CPU without CMPXCHG16B: this QEMU's (7.2) emulation of it leaves EFLAGS
            // corrupt now and then, and 6.12's slab allocator uses it on every allocation
            // (6.1 does not). With it, 6.12 oopsed at boot in 4 of 12 boots here (slab,
            // ACPI, do_sync_core's IRET, each with garbage EFLAGS), with 1 or 2 vCPUs; without
            // it, 0 of 24. Without CX16 the kernel takes its locked slab path instead.
            "-cpu",
            "qemu64,-cx16",
            "-accel",
            "tcg,thread=single",
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|err| err.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|err| format!("qemu-system-x86_64: {err}"))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match qemu.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break;
            }
        }
    }
    let output = std::fs::read_to_string(&console).unwrap_or_default();
    let checks = parse_checks(&output);
    let error = (!output.contains("KERNEL-SMOKE-END")).then(|| {
        let tail: Vec<&str> = output.lines().rev().take(8).collect();
        format!(
            "the suite did not finish (console {}): {}",
            console.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    });
    // The oops's location and the call trace's function names, to tell ours from the kernel's.
    let oops = output.contains("Oops:").then(|| {
        output
            .lines()
            .filter(|line| line.contains("RIP: 0010:") || line.contains("+0x"))
            .map(|line| line.split(']').nth(1).unwrap_or(line).trim())
            .collect::<Vec<_>>()
            .join(" ")
    });
    Ok(Row {
        kernel: kernel.name.to_string(),
        release: release.to_string(),
        covers: kernel.covers.to_string(),
        checks,
        error,
        oops,
        seconds: 0.0,
    })
}

/// apt, with a sources list of its own under the cache (the machine's lists are left alone).
fn apt(cache: &Path, tool: &str) -> Command {
    let apt = cache.join("apt");
    let mut command = Command::new(tool);
    for option in [
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".to_string(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "Debug::NoLocking=1".to_string(),
        "APT::Sandbox::User=root".to_string(),
    ] {
        command.args(["-o", &option]);
    }
    command
}

fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|err| format!("{command:?}: {err}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel image, its unpacked modules directory and its release, fetched once.
fn fetch(cache: &Path, kernel: &Kernel) -> Result<(PathBuf, PathBuf, String), String> {
    let apt_dir = cache.join("apt");
    std::fs::create_dir_all(apt_dir.join("lists/partial")).map_err(|err| err.to_string())?;
    std::fs::create_dir_all(apt_dir.join("cache/archives/partial"))
        .map_err(|err| err.to_string())?;
    let sources = apt_dir.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let list = [
        ("http://deb.debian.org/debian", "bookworm"),
        ("http://deb.debian.org/debian-security", "bookworm-security"),
        ("http://deb.debian.org/debian", "bookworm-backports"),
    ]
    .iter()
    .map(|(uri, suite)| format!("deb [signed-by={keyring}] {uri} {suite} main\n"))
    .collect::<String>();
    let fresh = std::fs::read_to_string(&sources).ok().as_deref() == Some(list.as_str())
        && std::fs::read_dir(apt_dir.join("lists")).is_ok_and(|entries| entries.count() > 2);
    if !fresh {
        std::fs::write(&sources, &list).map_err(|err| err.to_string())?;
        run(apt(cache, "apt-get").arg("update").arg("-qq"))?;
    }
    // The suite's meta package names the image package of its newest build.
    let meta = run(apt(cache, "apt-cache")
        .arg("show")
        .arg(format!("linux-image-cloud-amd64/{}", kernel.suite)))?;
    let image = meta
        .lines()
        .find_map(|line| line.strip_prefix("Depends: "))
        .and_then(|depends| {
            depends
                .split(',')
                .map(|dependency| dependency.trim().split(' ').next().unwrap_or_default())
                .find(|name| name.starts_with("linux-image-") || name.starts_with("linux-binary-"))
        })
        .ok_or_else(|| {
            format!(
                "no image package in linux-image-cloud-amd64/{}",
                kernel.suite
            )
        })?
        .to_string();
    let unpacked = cache.join(&image);
    if !unpacked.join("boot").is_dir() {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs).map_err(|err| err.to_string())?;
        run(apt(cache, "apt-get")
            .current_dir(&debs)
            .args(["download", "-qq", &image]))?;
        let deb = std::fs::read_dir(&debs)
            .map_err(|err| err.to_string())?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(&format!("{image}_")))
            })
            .ok_or_else(|| format!("apt-get download {image} left no .deb"))?;
        let partial = cache.join(format!("{image}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        std::fs::rename(&partial, &unpacked).map_err(|err| err.to_string())?;
    }
    let vmlinuz = std::fs::read_dir(unpacked.join("boot"))
        .map_err(|err| err.to_string())?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{image} holds no vmlinuz"))?;
    let release = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = unpacked.join("lib/modules").join(&release).join("kernel");
    Ok((vmlinuz, modules, release))
}

/// A newc cpio archive: the init script, busybox, `ip`, the agent, the suite, the libraries
/// they link and the modules (decompressed: busybox's insmod takes plain ones).
fn initramfs(
    cache: &Path,
    kernel: &Kernel,
    modules: &Path,
    agent: &Path,
    smoke: &Path,
) -> Result<PathBuf, String> {
    let mut archive = Cpio::default();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64", "proc", "sys", "dev", "run",
        "tmp", "etc", "var", "modules",
    ] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", &read(Path::new("/bin/busybox"))?, 0o755);
    let ip = which("ip")?;
    let mut libraries = BTreeSet::new();
    for (target, source) in [
        ("bin/drain-agent", agent.to_path_buf()),
        ("bin/kernel-smoke", smoke.to_path_buf()),
        ("bin/ip", ip.clone()),
    ] {
        archive.file(target, &read(&source)?, 0o755);
        libraries.extend(linked_libraries(&source)?);
    }
    for library in libraries {
        let target = library
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        for parent in Path::new(&target).ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                archive.dir(&parent.to_string_lossy());
            }
        }
        archive.file(&target, &read(&library)?, 0o755);
    }
    let mut load = String::new();
    for (index, module) in MODULES.iter().enumerate() {
        let plain = modules.join(module);
        let bytes = if plain.exists() {
            read(&plain)?
        } else {
            let xz = PathBuf::from(format!("{}.xz", plain.display()));
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&xz)
                .output()
                .map_err(|err| format!("xz -dc {}: {err}", xz.display()))?;
            if !out.status.success() {
                return Err(format!("xz -dc {} failed", xz.display()));
            }
            out.stdout
        };
        let name = format!("modules/{index}.ko");
        archive.file(&name, &bytes, 0o644);
        load.push_str(&format!(
            "insmod /{name} || echo 'insmod {module} failed'\n"
        ));
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t cgroup2 none /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t tmpfs tmpfs /tmp\n\
         {load}\
         /bin/kernel-smoke run --prefix ks --agent /bin/drain-agent --dir /tmp/smoke\n\
         echo KERNEL-SMOKE-END\n\
         poweroff -f\n"
    );
    archive.file("init", init.as_bytes(), 0o755);
    let path = cache.join(format!("{}.cpio", kernel.name));
    std::fs::write(&path, archive.finish()).map_err(|err| format!("{}: {err}", path.display()))?;
    Ok(path)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    let path = resolved(path);
    std::fs::read(&path).map_err(|err| format!("{}: {err}", path.display()))
}

/// Follows symlinks: the archive holds the file under the name it is linked by.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn which(program: &str) -> Result<PathBuf, String> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
        .ok_or_else(|| format!("`{program}` not found (package iproute2)"))
}

/// The shared libraries `ldd` lists for a binary, the dynamic loader included.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = run(Command::new("ldd").arg(binary))?;
    Ok(out
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim().split(' ').next()?,
                None => line.trim().split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A "newc" cpio archive, the initramfs format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040_755, &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// A fresh directory under the system's temporary directory.
fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Writes the matrix as JSON.
pub fn write_json(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let value = json!({ "kernels": rows.iter().map(Row::to_json).collect::<Vec<_>>() });
    writeln!(file, "{}", serde_json::to_string_pretty(&value).unwrap())
}
