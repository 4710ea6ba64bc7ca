//! The fleet: the Debian package installs and removes cleanly, the Ansible role and playbooks
//! pass ansible-lint, and the real `ansible-playbook` upgrades the demo's tier over SSH under
//! load — every node, or up to the first node whose new version fails its health check — on
//! API nodes that boot systemd (the package installed by apt, the agent under its shipped
//! unit), and once on the older namespace nodes without systemd.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use drain_agent_tests::{
    Netns, TempDir, agent_binary, command_output,
    fleet::{self, FleetOptions, NodeKind},
    must, package, require_root,
    tier::host_names,
    topology::Topology,
};
use serde_json::Value;

/// Removes the package on drop, also when the test fails half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = command_output("dpkg", &["--purge", package::NAME]);
    }
}

fn dpkg_status() -> String {
    let out = command_output("dpkg-query", &["-W", "-f=${Status}", package::NAME]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_installs_with_dpkg_its_unit_verifies_and_dpkg_removes_it() {
    require_root();
    assert!(
        !dpkg_status().contains("installed"),
        "drain-agent is already installed on this machine; this test installs and removes it: \
         remove it first (dpkg --purge drain-agent)"
    );
    let dir = TempDir::new("package");
    let deb = package::build(&agent_binary(), dir.path()).expect("build the package");
    let _installed = Installed;
    let out = command_output("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "dpkg -i: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dpkg_status(), "install ok installed");
    let files = [
        package::BINARY,
        package::UNIT,
        "/usr/share/doc/drain-agent/README.md",
        "/usr/share/doc/drain-agent/copyright",
        "/usr/share/doc/drain-agent/docs/operations.md",
        "/usr/share/doc/drain-agent/docs/fleet.md",
        "/usr/share/doc/drain-agent/examples/config.toml",
    ];
    for file in files {
        assert!(Path::new(file).exists(), "{file} not installed");
    }
    let version = must(package::BINARY, &["--version"]);
    assert!(version.contains(&package::version()), "{version}");
    let unit = std::fs::read_to_string(package::UNIT).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={} run", package::BINARY))
            && !unit.contains("/usr/local"),
        "the installed unit runs another binary:\n{unit}"
    );
    let verify = Command::new("systemd-analyze")
        .args(["verify", package::UNIT])
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {stderr}",
        package::UNIT
    );
    // The example config is valid: check-config accepts it on a node that has its interface,
    // its only warnings being the load balancers it cannot reach here.
    // It runs in a namespace of its own with only loopback and an eth0 of its own, so the example's
    // load balancers (documentation addresses) are unreachable at once and never contacted.
    // (A veth pair, both ends inside: this kernel has no dummy driver.)
    let node = Netns::create(format!("da-pkg-{}", std::process::id()));
    node.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    node.ip(&["link", "set", "eth0", "up"]);
    let example = node
        .command(package::BINARY)
        .args([
            "check-config",
            "--allow-warnings",
            "/usr/share/doc/drain-agent/examples/config.toml",
        ])
        .output()
        .expect("drain-agent check-config");
    let said = String::from_utf8_lossy(&example.stdout).into_owned()
        + &String::from_utf8_lossy(&example.stderr);
    let unexpected: Vec<&str> = said
        .lines()
        .filter(|line| {
            line.starts_with("warning:") && !line.contains("cannot reach the runtime API")
        })
        .collect();
    assert!(
        example.status.success()
            && said.contains("config.toml: 0 error(s)")
            && unexpected.is_empty(),
        "the example config does not pass check-config: {said}"
    );
    eprintln!("{said}");
    drop(node);

    let out = command_output("dpkg", &["-r", package::NAME]);
    assert!(
        out.status.success(),
        "dpkg -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in files {
        assert!(!Path::new(file).exists(), "{file} left after dpkg -r");
    }
    assert!(
        !Path::new("/usr/share/doc/drain-agent").exists(),
        "the doc folder is left after dpkg -r"
    );
}

#[test]
fn the_role_and_the_playbooks_pass_ansible_lint() {
    let cache = TempDir::new("ansible-lint");
    let out = Command::new("ansible-lint")
        .args(["--offline", "--profile", "production", "--nocolor"])
        .current_dir(fleet::ansible_dir())
        .env("XDG_CACHE_HOME", cache.path())
        .env("ANSIBLE_HOME", cache.path().join("ansible"))
        .output()
        .expect("ansible-lint (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "ansible-lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a fleet run could leave outside its directory: namespaces, processes, Ansible's and
/// ssh's files in root's home, sshd's directory, login records.
#[derive(Debug, PartialEq)]
struct Footprint {
    namespaces: Vec<String>,
    processes: Vec<String>,
    files: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Footprint {
    fn take(run_dir: &Path, namespace_marker: &str) -> Footprint {
        let namespaces = String::from_utf8_lossy(&command_output("ip", &["netns", "list"]).stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.ends_with(namespace_marker))
            .map(str::to_string)
            .collect();
        let processes = String::from_utf8_lossy(
            &command_output("pgrep", &["-af", run_dir.to_str().unwrap()]).stdout,
        )
        .lines()
        .map(str::to_string)
        .collect();
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
        let files = [
            home.join(".ansible"),
            home.join(".ansible/tmp"),
            home.join(".ssh"),
            home.join(".ssh/known_hosts"),
            PathBuf::from("/run/sshd"),
            PathBuf::from("/var/log/wtmp"),
            PathBuf::from("/var/log/lastlog"),
            PathBuf::from("/var/log/btmp"),
            PathBuf::from("/var/cache/drain-agent"),
            fleet::ansible_dir().join(".ansible"),
            fleet::ansible_dir().join("rolling-upgrade.retry"),
        ]
        .into_iter()
        .map(|path| {
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            (path, modified)
        })
        .collect();
        Footprint {
            namespaces,
            processes,
            files,
        }
    }
}

/// Builds the tier, runs the fleet, tears everything down, and checks that nothing is left.
fn run_fleet(nodes: usize, break_node: Option<&str>, kind: NodeKind) -> Value {
    let names = host_names(nodes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let topology = Topology::new(&names);
    let run_dir = topology.dir.path().to_path_buf();
    let marker = topology.hosts[0]
        .netns
        .name()
        .trim_start_matches("da-client")
        .to_string();
    let before = Footprint::take(&run_dir, &marker);
    let results = TempDir::new("fleet-results");
    let report = {
        let fleet = fleet::start(topology, nodes, kind);
        fleet::run(
            &fleet,
            &FleetOptions {
                rate: 150,
                to_version: "1.1".into(),
                break_node: break_node.map(str::to_string),
                results: results.path().to_path_buf(),
            },
        )
    };
    eprintln!("{}", fleet::summary(&report));
    let after = Footprint::take(&run_dir, &marker);
    assert!(
        after.namespaces.is_empty(),
        "namespaces left: {:?}",
        after.namespaces
    );
    assert!(
        after.processes.is_empty(),
        "processes left: {:?}",
        after.processes
    );
    assert_eq!(
        after.files, before.files,
        "files outside the run's directory changed"
    );
    assert!(!run_dir.exists(), "the run's directory was left behind");
    let svg = std::fs::read_to_string(results.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "no timeline");
    let log = std::fs::read_to_string(results.path().join("ansible-rolling-upgrade.log")).unwrap();
    assert!(
        log.contains("PLAY RECAP"),
        "Ansible's output has no recap:\n{log}"
    );
    report
}

fn assert_no_failed_request(report: &Value) {
    let load = &report["load"];
    assert!(
        load["requests"].as_u64().unwrap() >= 1500,
        "too little load: {load}"
    );
    assert_eq!(load["failed"], 0, "failed requests: {}", load["errors"]);
    assert_eq!(load["non_2xx"], 0, "{load}");
}

/// Every node booted systemd, which runs the agent from the package under its shipped unit.
fn assert_agents_run_by_systemd_from_the_package(report: &Value) {
    for node in report["nodes"].as_array().unwrap() {
        assert_eq!(node["pid1"], "systemd", "{node}");
        assert_eq!(node["agent_unit"], "active", "{node}");
        assert_eq!(node["agent_package"], package::version(), "{node}");
    }
}

#[test]
fn a_rolling_upgrade_by_ansible_on_nodes_that_boot_systemd_installs_the_package_and_upgrades_every_node_without_a_failed_request()
 {
    let report = run_fleet(2, None, NodeKind::Booted);
    assert_agents_run_by_systemd_from_the_package(&report);
    for node in report["nodes"].as_array().unwrap() {
        // The cycle's restart went through systemd: the API unit's start time changed.
        assert_eq!(node["api_restarted_by_systemd"], true, "{node}");
    }
    assert_every_node_upgraded_without_a_failed_request(&report);
}

#[test]
fn a_rolling_upgrade_by_ansible_on_namespace_nodes_without_systemd_upgrades_every_node_without_a_failed_request()
 {
    let report = run_fleet(2, None, NodeKind::Namespaces);
    assert_every_node_upgraded_without_a_failed_request(&report);
}

fn assert_every_node_upgraded_without_a_failed_request(report: &Value) {
    assert_eq!(report["playbook"]["exit_code"], 0, "{}", report["playbook"]);
    for node in ["node1", "node2"] {
        let recap = &report["playbook"]["recap"][node];
        assert!(
            recap["ok"].as_u64() > Some(0),
            "{node} not in the recap: {recap}"
        );
        assert_eq!(
            (&recap["failed"], &recap["unreachable"]),
            (&0.into(), &0.into()),
            "{node}: {recap}"
        );
        assert_eq!(report["final_versions"][node], "1.1", "{node}");
        assert_eq!(report["serving"][node], true, "{node} is not serving");
    }
    for node in report["nodes"].as_array().unwrap() {
        assert_eq!(node["exit_code"], 0, "{node}");
        assert_eq!(node["cut_in_flight"], 0, "{node}");
    }
    assert_no_failed_request(report);
    assert_eq!(
        report["checks"]["site_yml_again_changes_nothing"], true,
        "the role changed something on a second run: {}",
        report["site_yml_again"]
    );
    assert_eq!(report["ok"], true, "{}", report["checks"]);
}

#[test]
fn a_node_whose_new_version_fails_its_health_check_stops_the_play_and_later_nodes_keep_the_old_version()
 {
    let report = run_fleet(3, Some("node2"), NodeKind::Booted);
    assert_agents_run_by_systemd_from_the_package(&report);
    let playbook = &report["playbook"];
    assert!(
        playbook["exit_code"].as_i64().is_some_and(|code| code != 0),
        "ansible-playbook exited 0 although node2 failed: {playbook}"
    );
    assert_eq!(playbook["recap"]["node1"]["failed"], 0, "{playbook}");
    assert_eq!(playbook["recap"]["node2"]["failed"], 1, "{playbook}");
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["exit_code"], 0, "node1: {}", nodes[0]);
    // The cycle rolled node2 back to the version it ran before (exit 6): serving 1.0.
    assert_eq!(nodes[1]["exit_code"], 6, "node2: {}", nodes[1]);
    assert_eq!(nodes[2]["touched"], false, "node3 was cycled: {}", nodes[2]);
    // systemd restarted node1's API and node2's (its restart, then its rollback unit), not
    // node3's.
    let restarted: Vec<Option<bool>> = nodes
        .iter()
        .map(|node| node["api_restarted_by_systemd"].as_bool())
        .collect();
    assert_eq!(
        restarted,
        [Some(true), Some(true), Some(false)],
        "{nodes:?}"
    );
    assert_eq!(report["final_versions"]["node1"], "1.1");
    assert_eq!(report["final_versions"]["node2"], "1.0");
    assert_eq!(report["final_versions"]["node3"], "1.0");
    for node in ["node1", "node2", "node3"] {
        assert_eq!(report["serving"][node], true, "{node} is not serving");
    }
    assert_no_failed_request(&report);
    assert_eq!(report["ok"], true, "{}", report["checks"]);
}
