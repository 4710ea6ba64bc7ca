//! The seed's API tier: two load balancers running HAProxy and keepalived with one VIP, API
//! nodes running gunicorn and a drain-agent, and a client host. Shared by `cargo xtask demo`,
//! `cargo xtask lab` and the demo test.

use std::{fs::File, net::Ipv4Addr, time::Duration};

use crate::{
    Agent, Process,
    topology::{
        API_PORT, FRONTEND_PORT, Haproxy, Host, Topology, haproxy_config, serve_api_script,
        start_api, start_node_agent_with_env,
    },
    wait_until,
};

/// The virtual IP keepalived moves between the load balancers.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// keepalived's VRRP router id.
const VIRTUAL_ROUTER_ID: u8 = 50;
/// HAProxy's monitor endpoint keepalived checks (fails while HAProxy is stopping).
const MONITOR_PORT: u16 = 8404;

/// Host names: client, lb1, lb2, node1..nodeN.
pub fn host_names(nodes: usize) -> Vec<String> {
    let mut names = vec!["client".to_string(), "lb1".into(), "lb2".into()];
    names.extend((1..=nodes).map(|i| format!("node{i}")));
    names
}

/// How the tier differs between the demo and the soak.
#[derive(Debug, Clone, Default)]
pub struct TierOptions {
    /// keepalived with `nopreempt` (both instances BACKUP, a failing track script puts the
    /// holder in FAULT): once moved, the VIP stays where it is when the other HAProxy comes
    /// back, instead of moving back abruptly with the connections it carries.
    pub nopreempt: bool,
    /// Give every agent a `rollback` (serve-api.sh rollback: the version that ran before the
    /// last restart, started again).
    pub rollback: bool,
    /// Start no agents: the fleet installs and starts them with the Ansible role.
    pub without_agents: bool,
    /// Start no API servers: the nodes' own service managers run them (booted nodes).
    pub api_by_nodes: bool,
    /// The API's stop cuts the requests in flight (gunicorn `--graceful-timeout 0`, like a
    /// service manager's kill at once) instead of finishing them: then only a drain that
    /// waits for them loses none.
    pub stop_cuts_requests: bool,
    /// The agents' drains end without waiting for in-flight requests (the test hook
    /// `DRAIN_AGENT_TEST_DRAIN_WITHOUT_WAITING`): the negative control.
    pub drain_without_waiting: bool,
}

/// A running tier.
pub struct ApiTier {
    pub topology: Topology,
    pub lbs: Vec<Haproxy>,
    pub keepalived: Vec<Process>,
    pub agents: Vec<Agent>,
    pub nodes: Vec<String>,
}

impl ApiTier {
    /// Starts everything on `topology` (built from [`host_names`]) with the APIs on `version`,
    /// and waits until lb1 holds the VIP and every server is UP on both load balancers.
    pub fn start(topology: Topology, nodes: usize, version: &str) -> ApiTier {
        ApiTier::start_with(topology, nodes, version, &TierOptions::default())
    }

    /// [`ApiTier::start`] with options.
    pub fn start_with(
        topology: Topology,
        nodes: usize,
        version: &str,
        options: &TierOptions,
    ) -> ApiTier {
        let node_names: Vec<String> = (1..=nodes).map(|i| format!("node{i}")).collect();
        let node_hosts: Vec<&Host> = node_names.iter().map(|n| topology.host(n)).collect();
        let lb_hosts = [topology.host("lb1"), topology.host("lb2")];
        for node in &node_hosts {
            if options.stop_cuts_requests {
                std::fs::write(node.dir.join("graceful-timeout"), "0").unwrap();
            }
            if !options.api_by_nodes {
                start_api(node, version);
            }
        }
        let env: &[(&str, &str)] = if options.drain_without_waiting {
            &[("DRAIN_AGENT_TEST_DRAIN_WITHOUT_WAITING", "1")]
        } else {
            &[]
        };
        let agents = node_hosts
            .iter()
            .filter(|_| !options.without_agents)
            .map(|node| {
                let mut extra = "drain_timeout = \"30s\"\n".to_string();
                // The kernel gate, as an operator would set it: the load balancers (their
                // health checks) get through, anything else is refused while a node drains.
                extra.push_str(&format!(
                    "gate = {{ allow = [\"{}/32\", \"{}/32\"] }}\n",
                    lb_hosts[0].v4, lb_hosts[1].v4
                ));
                // A handover (its `start` runs the next version beside the running one).
                extra.push_str(&crate::topology::handover_config());
                extra.push('\n');
                if options.rollback {
                    extra.push_str(&format!(
                        "rollback = {{ command = [\"{script}\", \"rollback\", \"{dir}\", \"{API_PORT}\"], timeout = \"60s\" }}\n",
                        script = serve_api_script().display(),
                        dir = node.dir.display(),
                    ));
                }
                start_node_agent_with_env(node, &lb_hosts, &extra, "", env)
            })
            .collect();
        hand_over_orphaned_connections(lb_hosts[0], lb_hosts[1]);
        hand_over_orphaned_connections(lb_hosts[1], lb_hosts[0]);
        let lbs: Vec<Haproxy> = lb_hosts
            .iter()
            .map(|lb| Haproxy::start(lb, &tier_haproxy_config(lb, &node_hosts)))
            .collect();
        let mut keepalived = vec![start_keepalived(lb_hosts[0], 101, options.nopreempt)];
        if options.nopreempt {
            // Both start as BACKUP and the first to become master keeps the VIP: let it be lb1.
            wait_until(Duration::from_secs(20), "lb1 to take the VIP", || {
                holds_vip(lb_hosts[0].netns.name())
            });
        }
        keepalived.push(start_keepalived(lb_hosts[1], 100, options.nopreempt));
        let tier = ApiTier {
            topology,
            lbs,
            keepalived,
            agents,
            nodes: node_names,
        };
        wait_until(Duration::from_secs(20), "lb1 to hold the VIP", || {
            tier.vip_holder().as_deref() == Some("lb1")
        });
        for lb in &tier.lbs {
            for node in &tier.nodes {
                wait_until(Duration::from_secs(15), "every server UP", || {
                    lb.status(node) == "UP"
                });
            }
        }
        tier
    }

    /// The load balancer that has the VIP on its eth0 now.
    pub fn vip_holder(&self) -> Option<String> {
        ["lb1", "lb2"]
            .into_iter()
            .find(|name| holds_vip(self.topology.host(name).netns.name()))
            .map(str::to_string)
    }

    /// The HAProxy of a load balancer by name.
    pub fn lb(&self, name: &str) -> &Haproxy {
        &self.lbs[if name == "lb1" { 0 } else { 1 }]
    }

    /// Leaves everything running after this process exits (for `cargo xtask lab up`).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// Whether the host in network namespace `netns` has the VIP on its eth0.
pub fn holds_vip(netns: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(&format!("inet {VIP}/")))
}

/// The tier's HAProxy: the test config plus a graceful stop. With `grace`, listeners stay
/// open after SIGUSR1 while keepalived notices the stop through the monitor endpoint (1 s) and
/// the backup takes the VIP (VRRP's master-down interval, about 3.6 s at advert_int 1).
/// `hard-stop-after` bounds the stopping process's life, as HAProxy's documentation advises:
/// whatever connection is still open 40 s after the stop (longer than any request the tier
/// serves) is closed.
pub fn tier_haproxy_config(lb: &Host, nodes: &[&Host]) -> String {
    // Bind the VIP as in the seed; `transparent` (IP_TRANSPARENT, like ip_nonlocal_bind)
    // also lets this HAProxy finish the answers it owes after keepalived moved the VIP away.
    let config = haproxy_config(lb, nodes)
        .replacen(
            &format!("bind :{FRONTEND_PORT}\n"),
            &format!("bind {VIP}:{FRONTEND_PORT} transparent\n"),
            1,
        )
        .replacen(
            "global\n",
            &format!(
                "global\n    grace 8s\n    hard-stop-after 40s\n    pidfile {}/haproxy.pid\n",
                lb.dir.display()
            ),
            1,
        );
    format!(
        "{config}
frontend monitor
    bind 127.0.0.1:{MONITOR_PORT}
    monitor-uri /ext-check
    monitor fail if {{ stopping }}
"
    )
}

/// Lets connections survive a VIP move, as a load-balancer pair with connection hand-off
/// does: keepalived's gratuitous ARP moves every packet for the VIP to the new holder at once,
/// including those of connections the old holder still serves (a request whose last bytes,
/// or whose handshake's final ACK, were on the wire). Without this the new holder answers
/// them with a RST, and the client sees a connection error.
///
/// - Both load balancers keep the VIP on `lo` for good, and never answer ARP for it from
///   there (`arp_ignore`/`arp_announce`, as in LVS direct routing): only keepalived's copy on
///   eth0 is announced, so the VIP still has one holder, but either can finish what it began.
/// - A packet for the VIP that no connection on this load balancer knows (conntrack: invalid,
///   with `nf_conntrack_tcp_loose = 0` so mid-stream packets are not adopted) and that did not
///   come from the peer is routed to the peer, which delivers it to its own connection.
///   Packets from the peer are never sent back, so nothing loops.
fn hand_over_orphaned_connections(lb: &Host, peer: &Host) {
    let netns = &lb.netns;
    netns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    for setting in [
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.eth0.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
        "net.ipv4.conf.eth0.arp_announce=2",
        "net.ipv4.ip_forward=1",
        // A packet forwarded out of the interface it came in on would make the client
        // install a redirect for the whole VIP.
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.eth0.rp_filter=0",
        "net.netfilter.nf_conntrack_tcp_loose=0",
    ] {
        let status = netns
            .command("sysctl")
            .args(["-qw", setting])
            .status()
            .expect("run sysctl");
        assert!(status.success(), "sysctl -w {setting} in {}", lb.name);
    }
    let peer_mac = mac_of(peer);
    let rules = format!(
        "table ip handoff {{
    chain prerouting {{
        type filter hook prerouting priority -150; policy accept;
        ip daddr {VIP} tcp dport {FRONTEND_PORT} ether saddr != {peer_mac} ct state invalid meta mark set 1
    }}
}}
"
    );
    let rules_file = lb.dir.join("handoff.nft");
    std::fs::write(&rules_file, rules).unwrap();
    let status = netns
        .command("nft")
        .arg("-f")
        .arg(&rules_file)
        .status()
        .expect("run nft");
    assert!(
        status.success(),
        "nft -f {} in {}",
        rules_file.display(),
        lb.name
    );
    // Marked packets are routed to the peer before the local table would deliver them here.
    netns.ip(&["rule", "add", "pref", "100", "fwmark", "1", "lookup", "100"]);
    netns.ip(&["rule", "add", "pref", "200", "lookup", "local"]);
    netns.ip(&["rule", "del", "pref", "0", "lookup", "local"]);
    netns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &peer.v4.to_string(),
        "dev",
        "eth0",
        "table",
        "100",
    ]);
}

/// A host's eth0 MAC address.
fn mac_of(host: &Host) -> String {
    let shown = host.netns.ip(&["-br", "link", "show", "eth0"]);
    shown
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC for {} in: {shown}", host.name))
        .to_string()
}

/// keepalived as in the seed: VRRP on eth0, the VIP, and a track script on HAProxy's health.
/// With `nopreempt`, both instances are BACKUP and never take the VIP from a working holder;
/// the track script has no weight, so a failing check puts the holder in FAULT (it releases
/// the VIP at once) instead of lowering its priority, which nopreempt would ignore.
pub fn keepalived_config(lb: &Host, priority: u8, nopreempt: bool) -> String {
    let (state, weight, preempt) = if nopreempt {
        ("BACKUP", "", "\n    nopreempt")
    } else if priority > 100 {
        ("MASTER", "\n    weight 2", "")
    } else {
        ("BACKUP", "\n    weight 2", "")
    };
    format!(
        "global_defs {{
    router_id {name}
    script_user root
    enable_script_security
}}

vrrp_script chk_haproxy {{
    script \"/usr/bin/curl -sf -o /dev/null -m 1 http://127.0.0.1:{MONITOR_PORT}/ext-check\"
    interval 1
    fall 1
    rise 2{weight}
}}

vrrp_instance api {{
    state {state}{preempt}
    interface eth0
    virtual_router_id {VIRTUAL_ROUTER_ID}
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
    track_script {{
        chk_haproxy
    }}
}}
",
        name = lb.name,
    )
}

fn start_keepalived(lb: &Host, priority: u8, nopreempt: bool) -> Process {
    let config = lb.dir.join("keepalived.conf");
    std::fs::write(&config, keepalived_config(lb, priority, nopreempt)).unwrap();
    let log = File::create(lb.dir.join("keepalived.log")).unwrap();
    let mut command = lb.netns.command("keepalived");
    command
        .args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
        .arg(&config)
        .arg("--pid")
        .arg(lb.dir.join("keepalived.pid"))
        .arg("--vrrp_pid")
        .arg(lb.dir.join("vrrp.pid"))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    Process::spawn("keepalived", &mut command)
}
