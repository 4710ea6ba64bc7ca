//! Two HAProxy load balancers (runtime API on TCP, agent-check every 500 ms) in front of two
//! API nodes with an agent each, and a client: the set-up of the drain and crash tests.

use std::{net::SocketAddr, time::Duration};

use crate::{
    Agent,
    http::Connection,
    topology::{
        API_PORT, FRONTEND_PORT, Haproxy, HaproxyOptions, Host, Topology, haproxy_config_with,
        make_tls_certificate, start_api, start_node_agent,
    },
    wait_until,
};

pub struct Tier {
    pub topology: Topology,
    pub lbs: Vec<Haproxy>,
    pub agents: Vec<Agent>,
}

/// client, lb1, lb2, node1, node2: APIs on 1.0, an agent per node, HAProxy on both LBs, and
/// every server UP everywhere.
pub fn tier(extra_backend: &str) -> Tier {
    tier_with(extra_backend, "")
}

pub fn tier_with(extra_backend: &str, extra_top: &str) -> Tier {
    tier_with_options(extra_backend, extra_top, &HaproxyOptions::default())
}

/// [`tier_with`], HAProxy set up with `options` (e.g. without agent checks). With
/// `options.tls` the APIs serve HTTPS with a certificate of their own (and `extra_backend`
/// should bring a `health` over https, e.g. [`crate::topology::https_health_config`]).
pub fn tier_with_options(extra_backend: &str, extra_top: &str, options: &HaproxyOptions) -> Tier {
    let topology = Topology::new(&["client", "lb1", "lb2", "node1", "node2"]);
    let nodes: Vec<&Host> = vec![topology.host("node1"), topology.host("node2")];
    let lb_hosts: Vec<&Host> = vec![topology.host("lb1"), topology.host("lb2")];
    for node in &nodes {
        if options.tls {
            make_tls_certificate(node);
        }
        start_api(node, "1.0");
    }
    let agents = nodes
        .iter()
        .map(|node| start_node_agent(node, &lb_hosts, extra_backend, extra_top))
        .collect();
    let lbs: Vec<Haproxy> = lb_hosts
        .iter()
        .map(|lb| Haproxy::start(lb, &haproxy_config_with(lb, &nodes, options)))
        .collect();
    for lb in &lbs {
        for node in ["node1", "node2"] {
            wait_until(
                Duration::from_secs(10),
                &format!("{node} UP on HAProxy"),
                || lb.status(node) == "UP",
            );
        }
    }
    Tier {
        topology,
        lbs,
        agents,
    }
}

impl Tier {
    pub fn node(&self, name: &str) -> &Host {
        self.topology.host(name)
    }

    /// The version a node serves, asked directly.
    pub fn version_of(&self, node: &str) -> String {
        let addr = SocketAddr::new(self.node(node).v4.into(), API_PORT);
        self.topology.host("client").netns.run(move || {
            let mut connection = Connection::connect(addr).unwrap();
            connection.get("/").unwrap().version.unwrap_or_default()
        })
    }
}

impl Tier {
    /// Sends `/slow?ms=MS` through lb1, pinned to node1; the thread returns the status.
    pub fn slow_request_to_node1(&self, ms: u64) -> std::thread::JoinHandle<u16> {
        let lb1 = self.topology.host("lb1").addr(FRONTEND_PORT);
        let client = self.topology.host("client").netns.name().to_string();
        std::thread::spawn(move || {
            crate::enter_netns(&client);
            let mut connection = Connection::connect(lb1).unwrap();
            connection
                .send_raw(&format!(
                    "GET /slow?ms={ms} HTTP/1.1\r\nHost: api\r\nx-node: node1\r\n\r\n"
                ))
                .unwrap();
            connection.read_response().unwrap().status
        })
    }

    /// Every load balancer shows `server` in a status starting with `prefix`.
    pub fn assert_everywhere(&self, server: &str, prefix: &str) {
        for lb in &self.lbs {
            let status = lb.status(server);
            assert!(
                status.starts_with(prefix),
                "{server} is {status}, expected {prefix}"
            );
        }
    }
}
