//! The fleet: the demo's tier where every API node also runs sshd, and the real
//! `ansible-playbook` installs the agent with the role (deploy/ansible/site.yml), then upgrades
//! the API node by node (rolling-upgrade.yml) while oha sends load through the VIP.
//!
//! By default the API nodes boot systemd ([`crate::booted`]): the role installs the `.deb`
//! with apt, the agent runs under its shipped unit, a cycle restarts the API's unit. The older
//! lab ([`NodeKind::Namespaces`]) keeps nodes that share the host's file system and have no
//! systemd: the role unpacks the package under a prefix per node and starts the agent with
//! start-stop-daemon; sshd runs in a mount namespace of its own whose /run is a private tmpfs
//! (sshd needs /run/sshd). Either way everything — keys, configs, root file systems, Ansible's
//! temporary files — lives in the run's directory. `cargo xtask fleet` runs it; the fleet
//! tests a shorter one.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};

use crate::{
    Process, agent_binary,
    booted::{self, BootedNode, NodeSetup},
    demo, load, must,
    tier::{ApiTier, TierOptions, VIP},
    topology::{API_PORT, BACKEND, FRONTEND_PORT, Host, Topology, serve_api_script},
    wait_until,
};

/// The version the tier starts on.
pub const FROM_VERSION: &str = "1.0";
/// Where the role and the playbooks live.
pub fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ansible")
}
/// The lab's "install the new version" tasks (writes the node's version file).
fn lab_install_tasks() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fleet/install-lab-version.yml")
}
/// The longest a playbook may run before it is stopped (it never needs this much).
const PLAYBOOK_DEADLINE: Duration = Duration::from_secs(600);
/// Length of one oha run; runs follow each other until the playbook is done.
const LOAD_WINDOW: Duration = Duration::from_secs(5);

/// How the fleet's API nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Containers that boot systemd (`systemd-nspawn -b`): the agent installed by apt and run
    /// by its shipped unit, the API a systemd unit restarted by `systemd_unit`.
    Booted,
    /// Network namespaces on the host: sshd in a mount namespace, the agent under a prefix
    /// started by start-stop-daemon, the API by tests/app/serve-api.sh.
    Namespaces,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Requests per second the load generator sends to the VIP.
    pub rate: u32,
    /// Version the nodes are upgraded to.
    pub to_version: String,
    /// A node whose new version fails its health check: the play must stop there.
    pub break_node: Option<String>,
    /// Where report.json, timeline.svg and Ansible's output go.
    pub results: PathBuf,
}

/// The tier and its API nodes, ready for Ansible: the controller's key and every node's host
/// key made for this run; booted nodes already running systemd, sshd and the API.
pub struct Fleet {
    // Drop order: the containers power off before the tier removes their namespaces.
    pub booted: Vec<BootedNode>,
    pub tier: ApiTier,
    pub kind: NodeKind,
}

impl Fleet {
    /// A booted node by name (None for namespace nodes).
    pub fn booted(&self, name: &str) -> Option<&BootedNode> {
        self.booted.iter().find(|node| node.name == name)
    }
}

/// Starts the demo's tier without agents (the role installs them) on `topology`, its API
/// nodes of `kind`.
pub fn start(topology: Topology, nodes: usize, kind: NodeKind) -> Fleet {
    let names: Vec<String> = (1..=nodes).map(|i| format!("node{i}")).collect();
    let ssh_dir = topology.dir.path().join("fleet/ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    keygen(&ssh_dir.join("id_ed25519"), "drain-agent fleet controller");
    for name in &names {
        let node = topology.host(name);
        keygen(&node.dir.join("ssh_host_ed25519_key"), name);
    }
    let booted = match kind {
        NodeKind::Namespaces => Vec::new(),
        NodeKind::Booted => {
            let rootfs = booted::rootfs(&rootfs_cache())
                .unwrap_or_else(|err| panic!("the nodes' root file system: {err}"));
            let authorized_key = std::fs::read_to_string(ssh_dir.join("id_ed25519.pub")).unwrap();
            names
                .iter()
                .map(|name| {
                    let host = topology.host(name);
                    BootedNode::boot(
                        host,
                        &NodeSetup {
                            rootfs: &rootfs,
                            root: topology.dir.path().join("roots").join(name),
                            authorized_key: &authorized_key,
                            host_key: &host.dir.join("ssh_host_ed25519_key"),
                            version: FROM_VERSION,
                        },
                    )
                    .unwrap_or_else(|err| panic!("boot {name}: {err}"))
                })
                .collect()
        }
    };
    let tier = ApiTier::start_with(
        topology,
        nodes,
        FROM_VERSION,
        &TierOptions {
            without_agents: true,
            api_by_nodes: kind == NodeKind::Booted,
            ..TierOptions::default()
        },
    );
    Fleet { booted, tier, kind }
}

/// Where the nodes' root file system is cached: target/nodes.
fn rootfs_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nodes")
}

/// sshd on every API node, and what the controller needs to reach them: a key pair made for
/// this run, the nodes' host keys in a known_hosts file, an inventory. All in `dir`.
pub struct Ssh {
    // Killed on drop (and with their namespaces).
    _sshd: Vec<Process>,
    dir: PathBuf,
    pub inventory: PathBuf,
    pub reports: PathBuf,
}

impl Ssh {
    /// Starts sshd on every namespace node (booted nodes run their own), waits until each
    /// answers, and writes the known hosts and the inventory: `deb` is the package the role
    /// installs; `break_node` gets a version that fails its health check.
    pub fn start(fleet: &Fleet, deb: &Path, to_version: &str, break_node: Option<&str>) -> Ssh {
        let tier = &fleet.tier;
        let dir = tier.topology.dir.path().join("fleet");
        let ssh_dir = dir.join("ssh");
        let key = ssh_dir.join("id_ed25519");
        let mut known_hosts = String::new();
        let mut sshd = Vec::new();
        for name in &tier.nodes {
            let node = tier.topology.host(name);
            let host_key = node.dir.join("ssh_host_ed25519_key");
            let public = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
            let public: Vec<&str> = public.split_whitespace().take(2).collect();
            known_hosts.push_str(&format!("{} {}\n", node.v4, public.join(" ")));
            if fleet.kind == NodeKind::Namespaces {
                sshd.push(start_sshd(node, &host_key, &key.with_extension("pub")));
            }
        }
        std::fs::write(ssh_dir.join("known_hosts"), known_hosts).unwrap();
        let client = tier.topology.host("client");
        for name in &tier.nodes {
            let addr = SocketAddr::new(tier.topology.host(name).v4.into(), 22);
            wait_until(Duration::from_secs(10), "sshd to listen", || {
                client
                    .netns
                    .run(move || std::net::TcpStream::connect(addr).is_ok())
            });
        }
        let reports = dir.join("reports");
        std::fs::create_dir_all(&reports).unwrap();
        let deb = std::fs::canonicalize(deb).expect("the package exists");
        let inventory = dir.join("inventory.yml");
        std::fs::write(
            &inventory,
            serde_json::to_string_pretty(&inventory_for(
                fleet, &deb, to_version, break_node, &reports,
            ))
            .unwrap(),
        )
        .unwrap();
        Ssh {
            _sshd: sshd,
            dir,
            inventory,
            reports,
        }
    }

    /// Runs `ansible-playbook -i INVENTORY PLAYBOOK` from the client host (the operator's
    /// machine), saving its output to `log` (and echoing it as it comes with `echo`); returns
    /// the exit code and the output.
    pub fn playbook(
        &self,
        tier: &ApiTier,
        playbook: &str,
        log: &Path,
        echo: bool,
    ) -> (Option<i32>, String) {
        let ansible = self.dir.join("ansible");
        let ssh = self.dir.join("ssh");
        let mut command = tier.topology.host("client").netns.command("sh");
        command
            .args(["-c", "exec ansible-playbook -i \"$1\" \"$2\" 2>&1", "sh"])
            .arg(&self.inventory)
            .arg(playbook)
            .current_dir(ansible_dir())
            .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
            // Everything Ansible and ssh keep stays in the run's directory.
            .env("ANSIBLE_HOME", &ansible)
            .env("ANSIBLE_LOCAL_TEMP", ansible.join("tmp"))
            .env("ANSIBLE_REMOTE_TEMP", ansible.join("remote-tmp"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", ansible.join("cp"))
            .env("ANSIBLE_PRIVATE_KEY_FILE", ssh.join("id_ed25519"))
            .env(
                "ANSIBLE_SSH_ARGS",
                format!(
                    "-o ControlMaster=auto -o ControlPersist=30s -o IdentitiesOnly=yes \
                     -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
                     -o GlobalKnownHostsFile=/dev/null",
                    ssh.join("known_hosts").display()
                ),
            )
            .env("ANSIBLE_SSH_USETTY", "False")
            .env("ANSIBLE_TIMEOUT", "10")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("start ansible-playbook");
        let stdout = child.stdout.take().expect("piped stdout");
        let output = Arc::new(Mutex::new(String::new()));
        let mut file = std::fs::File::create(log).expect("create the Ansible log");
        let reader = {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("{line}");
                    }
                    let _ = writeln!(file, "{line}");
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            })
        };
        let deadline = Instant::now() + PLAYBOOK_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for ansible-playbook") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        reader.join().expect("the output reader");
        let output = output.lock().unwrap().clone();
        (status.and_then(|status| status.code()), output)
    }

    /// `drain-agent status --json` of a node's agent: the packaged binary in a booted node,
    /// the one the role installed under its prefix in a namespace node.
    pub fn agent_status(&self, fleet: &Fleet, node: &str) -> Option<Value> {
        let stdout = match fleet.booted(node) {
            Some(booted) => {
                let (ok, stdout) = booted.run(&["drain-agent", "status", "--json"]);
                ok.then_some(stdout.into_bytes())?
            }
            None => {
                let prefix = prefix(fleet.tier.topology.host(node));
                let out = Command::new(prefix.join("usr/bin/drain-agent"))
                    .args(["status", "--json", "--control-socket"])
                    .arg(prefix.join("run/drain-agent/control.sock"))
                    .output()
                    .ok()?;
                out.status.success().then_some(out.stdout)?
            }
        };
        serde_json::from_slice(&stdout).ok()
    }
}

/// Where the role installs a node's package (its install prefix).
fn prefix(node: &Host) -> PathBuf {
    node.dir.join("root")
}

fn keygen(path: &Path, comment: &str) {
    must(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

/// sshd in the node's network namespace and a mount namespace of its own, where /run is a
/// private tmpfs holding /run/sshd (its privilege-separation directory, a fixed path). Only
/// the controller's key may log in, as root, without a terminal (no login records).
fn start_sshd(node: &Host, host_key: &Path, authorized_key: &Path) -> Process {
    let config = node.dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {v4}:22
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_key}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitTTY no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
Subsystem sftp /usr/lib/openssh/sftp-server
",
            v4 = node.v4,
            host_key = host_key.display(),
            authorized_key = authorized_key.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(node.dir.join("sshd.log")).unwrap();
    let mut command = node.netns.command_keeping_mounts("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o mode=0755 fleet-run /run && mkdir -m 0755 /run/sshd && \
             exec /usr/sbin/sshd -D -e -f \"$0\"",
        )
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    Process::spawn("sshd", &mut command)
}

/// The lab's inventory: every API node (with its install prefix when it is a namespace
/// node), the load balancers' runtime APIs, the backend with the lab's restart and rollback
/// (the API's systemd units in a booted node, tests/app/serve-api.sh otherwise), and the
/// version each node is to get.
fn inventory_for(
    fleet: &Fleet,
    deb: &Path,
    to_version: &str,
    break_node: Option<&str>,
    reports: &Path,
) -> Value {
    let tier = &fleet.tier;
    let mut hosts = serde_json::Map::new();
    for name in &tier.nodes {
        let node = tier.topology.host(name);
        let new_version = if break_node == Some(name.as_str()) {
            format!("broken-{to_version}")
        } else {
            to_version.to_string()
        };
        let backend = |restart: Value, rollback: Value| {
            json!([{
                "name": BACKEND,
                "ports": [API_PORT],
                "haproxy": {"backend": BACKEND},
                "drain_timeout": "30s",
                "restart": restart,
                "rollback": rollback,
                "health": {
                    "http": format!("http://127.0.0.1:{API_PORT}/healthz"),
                    "expect": 200,
                    "timeout": "10s",
                },
            }])
        };
        let vars = match fleet.kind {
            NodeKind::Booted => json!({
                "ansible_host": node.v4.to_string(),
                "drain_agent_backends": backend(
                    json!({"systemd_unit": booted::API_UNIT, "timeout": "60s"}),
                    json!({"command": ["systemctl", "start", booted::ROLLBACK_UNIT], "timeout": "60s"}),
                ),
                "lab_node_dir": booted::STATE_IN_NODE,
                "lab_new_version": new_version,
            }),
            NodeKind::Namespaces => {
                let dir = node.dir.display().to_string();
                let script = serve_api_script().display().to_string();
                let command = |action: &str| json!({"command": [script, action, dir, API_PORT.to_string()], "timeout": "60s"});
                json!({
                    "ansible_host": node.v4.to_string(),
                    "drain_agent_prefix": prefix(node),
                    "drain_agent_backends": backend(command("restart"), command("rollback")),
                    "lab_node_dir": dir,
                    "lab_new_version": new_version,
                })
            }
        };
        hosts.insert(name.clone(), vars);
    }
    let lbs: Vec<&Host> = ["lb1", "lb2"]
        .iter()
        .map(|name| tier.topology.host(name))
        .collect();
    json!({
        "all": {"children": {"api_nodes": {
            "hosts": hosts,
            "vars": {
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "drain_agent_deb": deb,
                "drain_agent_interfaces": ["eth0"],
                "drain_agent_agent_check_allow": lbs.iter().map(|lb| lb.v4.to_string()).collect::<Vec<_>>(),
                "drain_agent_load_balancers": lbs.iter().map(|lb| json!({
                    "name": lb.name,
                    "runtime_api": format!("tcp:{}:{}", lb.v4, crate::topology::RUNTIME_API_PORT),
                })).collect::<Vec<_>>(),
                "rolling_upgrade_install_tasks": lab_install_tasks(),
                "rolling_upgrade_report_dir": reports,
            },
        }}},
    })
}

/// Runs the fleet on a tier from [`start_tier`]: builds the package, starts sshd on every
/// node, installs the agents with site.yml, then runs rolling-upgrade.yml under load. Returns
/// the report (also written to the results folder with the timeline and Ansible's output).
pub fn run(fleet: &Fleet, options: &FleetOptions) -> Value {
    let tier = &fleet.tier;
    std::fs::create_dir_all(&options.results).expect("create the results folder");
    let started = Instant::now();
    let started_at = SystemTime::now();
    let deb = crate::package::build(&agent_binary(), tier.topology.dir.path())
        .unwrap_or_else(|err| panic!("build the package: {err}"));
    let ssh = Ssh::start(
        fleet,
        &deb,
        &options.to_version,
        options.break_node.as_deref(),
    );
    eprintln!("fleet: sshd runs on every node; installing the agents with the role (site.yml)");
    let (deploy_code, _) = ssh.playbook(
        tier,
        "site.yml",
        &options.results.join("ansible-site.log"),
        true,
    );
    if deploy_code != Some(0) {
        save_journals(fleet, &options.results);
        return failed_before_upgrade(options, deploy_code, started);
    }
    // When systemd started each node's API before the upgrade: a cycle's restart changes it.
    let api_started_before: Vec<u64> = fleet
        .booted
        .iter()
        .map(|node| node.unit_started_us(booted::API_UNIT))
        .collect();

    let url = format!("http://{VIP}:{FRONTEND_PORT}/mix");
    let watch = demo::Watch::start(
        tier,
        &url,
        options.results.join("load"),
        (options.rate, 128, LOAD_WINDOW),
        started,
    );
    std::thread::sleep(Duration::from_secs(3));

    eprintln!(
        "fleet: upgrading every node to {} with rolling-upgrade.yml under load",
        options.to_version
    );
    let playbook_started_ms = started.elapsed().as_millis() as u64;
    let (exit_code, output) = ssh.playbook(
        tier,
        "rolling-upgrade.yml",
        &options.results.join("ansible-rolling-upgrade.log"),
        true,
    );
    let playbook_ended_ms = started.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(2));
    let (windows, probes, samples) = watch.finish();
    let windows = windows.expect("the load generator");

    let break_index = options
        .break_node
        .as_ref()
        .and_then(|name| tier.nodes.iter().position(|node| node == name));
    let mut nodes = Vec::new();
    let mut final_versions = serde_json::Map::new();
    let mut expected_versions = serde_json::Map::new();
    let mut serving = serde_json::Map::new();
    for (index, name) in tier.nodes.iter().enumerate() {
        let upgraded = break_index.is_none_or(|broken| index < broken);
        let expected = if upgraded {
            options.to_version.as_str()
        } else {
            FROM_VERSION
        };
        expected_versions.insert(name.clone(), json!(expected));
        final_versions.insert(name.clone(), json!(demo::version_of(tier, name)));
        serving.insert(name.clone(), json!(serving_everywhere(tier, name)));
        let last_operation = ssh.agent_status(fleet, name).and_then(|status| {
            status["backends"][0]["last_operation"]["operation"]
                .as_str()
                .map(str::to_string)
        });
        let mut entry = node_entry(
            name,
            &ssh.reports.join(format!("{name}.json")),
            started_at,
            last_operation,
        );
        if let Some(node) = fleet.booted(name) {
            entry["pid1"] = json!(node.pid1());
            entry["agent_unit"] = json!(node.unit_state("drain-agent.service"));
            entry["agent_package"] = json!(node.package_version(crate::package::NAME));
            entry["api_restarted_by_systemd"] =
                json!(node.unit_started_us(booted::API_UNIT) != api_started_before[index]);
        }
        nodes.push(entry);
    }
    save_journals(fleet, &options.results);
    // Booted nodes: systemd is PID 1 and runs the packaged agent, and it restarted the API of
    // every node the play reached (the broken one too: its restart, then its rollback) and of
    // no other.
    let booted_ok = nodes.iter().enumerate().all(|(index, node)| {
        fleet.kind == NodeKind::Namespaces
            || (node["pid1"] == "systemd"
                && node["agent_unit"] == "active"
                && node["agent_package"] == json!(crate::package::version())
                && node["api_restarted_by_systemd"]
                    == json!(break_index.is_none_or(|broken| index <= broken)))
    });
    let recap = recap(&output);
    let load = load::windows_summary(&windows);
    let expected_exit_ok = match break_index {
        None => exit_code == Some(0),
        Some(_) => exit_code.is_some_and(|code| code != 0),
    };
    let recap_ok = match break_index {
        None => tier.nodes.iter().all(|node| {
            recap[node]["failed"] == 0
                && recap[node]["unreachable"] == 0
                && recap[node]["ok"].as_u64() > Some(0)
        }),
        Some(broken) => recap[&tier.nodes[broken]]["failed"] == 1,
    };
    let untouched_ok = break_index.is_none_or(|broken| {
        nodes[broken + 1..]
            .iter()
            .all(|node| node["touched"] == false)
    });
    let versions_ok = final_versions == expected_versions;
    let serving_ok = serving.values().all(|v| *v == true);
    // A request never sent (every connection stuck) fails the run like a failed one.
    let load_ok = load["failed"] == 0
        && load["non_2xx"] == 0
        && load["not_sent"] == 0
        && load["requests"].as_u64() > Some(0);
    // The role again on the same nodes changes nothing: what an operator may re-run any time.
    let (rerun_code, rerun_output) = ssh.playbook(
        tier,
        "site.yml",
        &options.results.join("ansible-site-again.log"),
        false,
    );
    let rerun_recap = self::recap(&rerun_output);
    let idempotent = rerun_code == Some(0)
        && tier.nodes.iter().all(|node| {
            rerun_recap[node]["changed"] == 0 && rerun_recap[node]["ok"].as_u64() > Some(0)
        });
    let report = json!({
        "ok": expected_exit_ok && recap_ok && untouched_ok && versions_ok && serving_ok && load_ok
            && idempotent && booted_ok,
        "node_kind": match fleet.kind {
            NodeKind::Booted => "booted (systemd-nspawn -b, systemd as PID 1)",
            NodeKind::Namespaces => "namespaces (no systemd; the agent under a prefix)",
        },
        "title": format!("Rolling upgrade by Ansible under load{}", options.break_node.as_ref().map_or(String::new(), |node| format!(", {node} broken"))),
        "duration_ms": started.elapsed().as_millis() as u64,
        "playbook": {
            "exit_code": exit_code,
            "started_ms": playbook_started_ms,
            "ended_ms": playbook_ended_ms,
            "recap": recap,
        },
        "break": options.break_node,
        "checks": {
            "exit_code_as_expected": expected_exit_ok,
            "recap_as_expected": recap_ok,
            "later_nodes_untouched": untouched_ok,
            "versions_as_expected": versions_ok,
            "every_node_serving": serving_ok,
            "no_failed_request": load_ok,
            "site_yml_again_changes_nothing": idempotent,
            "agents_run_by_systemd_from_the_package": booted_ok,
        },
        "site_yml_again": {"exit_code": rerun_code, "recap": rerun_recap},
        "load": with_demo_latency(load, &url, options.rate),
        "nodes": nodes,
        "expected_versions": expected_versions,
        "final_versions": final_versions,
        "serving": serving,
        "failover": Value::Null,
        "versions_seen": demo::versions_seen(&probes),
        "probe": {
            "requests": probes.len(),
            "failed": probes.iter().filter(|p| p.status != Some(200)).count(),
        },
    });
    demo::write_report(&options.results, &report, &samples, &probes);
    report
}

/// Every booted node's journal of the agent and the API, into the results folder.
fn save_journals(fleet: &Fleet, results: &Path) {
    for node in &fleet.booted {
        for unit in ["drain-agent.service", booted::API_UNIT] {
            let _ = std::fs::write(
                results.join(format!("journal-{}-{unit}.log", node.name)),
                node.journal(unit),
            );
        }
    }
}

/// The report when the role could not even install the agents.
fn failed_before_upgrade(
    options: &FleetOptions,
    deploy_code: Option<i32>,
    started: Instant,
) -> Value {
    let report = json!({
        "ok": false,
        "duration_ms": started.elapsed().as_millis() as u64,
        "deploy": {"exit_code": deploy_code},
        "message": "site.yml failed: the agents are not installed (see ansible-site.log)",
    });
    std::fs::write(
        options.results.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("write report.json");
    report
}

/// The load figures under the names the demo's summary and timeline read.
fn with_demo_latency(mut load: Value, url: &str, rate: u32) -> Value {
    load["url"] = json!(url);
    load["rate_per_second"] = json!(rate);
    load["latency_p50_ms"] = load["latency_p50_ms_median_of_windows"].clone();
    load["latency_p99_ms"] = load["latency_p99_ms_worst_window"].clone();
    load
}

/// One node's line of the report, from the cycle report the playbook kept on the controller;
/// a node without one was never cycled (`touched` false, and its agent ran no operation).
fn node_entry(
    name: &str,
    report_file: &Path,
    started_at: SystemTime,
    last_operation: Option<String>,
) -> Value {
    let Ok(text) = std::fs::read_to_string(report_file) else {
        return json!({"name": name, "touched": last_operation.is_some(), "last_operation": last_operation});
    };
    let kept: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let report = &kept["report"];
    let cycle_started_ms = kept["cycle_started"]
        .as_str()
        .and_then(|at| humantime::parse_rfc3339(at).ok())
        .and_then(|at| at.duration_since(started_at).ok())
        .map(|since| since.as_millis() as u64);
    let mut entry = demo::node_entry(name, cycle_started_ms, kept["exit_code"].clone(), report);
    entry["touched"] = json!(true);
    entry["last_operation"] = json!(last_operation);
    entry
}

/// Whether both load balancers have the node UP and it answers (waits a little: the last
/// node's return may still be settling).
fn serving_everywhere(tier: &ApiTier, node: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = tier
            .lbs
            .iter()
            .all(|lb| lb.try_command("show stat -1 4 -1").is_some() && lb.status(node) == "UP");
        if up && demo::version_of(tier, node).is_some() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The PLAY RECAP: per host, its counters (ok, changed, unreachable, failed, ...).
pub fn recap(output: &str) -> Value {
    let mut hosts = serde_json::Map::new();
    let lines = output
        .lines()
        .skip_while(|line| !line.starts_with("PLAY RECAP"))
        .skip(1);
    for line in lines {
        let Some((host, counters)) = line.split_once(" : ") else {
            continue;
        };
        let counters: serde_json::Map<String, Value> = counters
            .split_whitespace()
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key.to_string(), json!(value.parse::<u64>().ok()?)))
            })
            .collect();
        hosts.insert(host.trim().to_string(), Value::Object(counters));
    }
    Value::Object(hosts)
}

/// The demo's summary, and what the play did.
pub fn summary(report: &Value) -> String {
    if let Some(message) = report["message"].as_str() {
        return format!("\n{message}\n");
    }
    let mut out = demo::summary(report);
    let playbook = &report["playbook"];
    out.push_str(&format!(
        "ansible-playbook rolling-upgrade.yml exited {} after {:.1}s\n",
        playbook["exit_code"],
        (playbook["ended_ms"].as_u64().unwrap_or(0) - playbook["started_ms"].as_u64().unwrap_or(0))
            as f64
            / 1000.0
    ));
    if let Some(node) = report["break"].as_str() {
        let untouched: Vec<&str> = report["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["touched"] == false)
            .filter_map(|n| n["name"].as_str())
            .collect();
        out.push_str(&format!(
            "{node} was given a version that fails its health check: the play stopped there; \
             untouched: {}\n",
            if untouched.is_empty() {
                "none".to_string()
            } else {
                untouched.join(", ")
            }
        ));
    }
    for (check, passed) in report["checks"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "{:<31} {}\n",
            check,
            if *passed == true { "ok" } else { "FAILED" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recap_gives_each_hosts_counters_and_ignores_what_comes_before() {
        let output = "TASK [x] ***\nnode1 : ok=3 changed=1\n\nPLAY RECAP *****\n\
            node1                      : ok=12   changed=3    unreachable=0    failed=0    skipped=1    rescued=0    ignored=0   \n\
            node2                      : ok=12   changed=3    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0   \n";
        let recap = recap(output);
        assert_eq!(recap["node1"]["ok"], 12);
        assert_eq!(recap["node1"]["failed"], 0);
        assert_eq!(recap["node2"]["failed"], 1);
        assert_eq!(recap["node2"]["skipped"], 0);
        assert_eq!(recap.as_object().unwrap().len(), 2);
    }

    #[test]
    fn no_recap_gives_no_hosts() {
        assert_eq!(recap("ERROR! the playbook could not be found\n"), json!({}));
    }
}
