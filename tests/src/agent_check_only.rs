//! One HAProxy that learns the nodes' state from agent-check alone: client, lb1, node1,
//! node2, and agents that know no runtime API.

use std::time::Duration;

use crate::{
    Agent,
    topology::{
        Haproxy, HaproxyOptions, Topology, haproxy_config_with, start_api, start_node_agent,
    },
    wait_until,
};

pub struct Tier {
    pub topology: Topology,
    pub lb: Haproxy,
    pub agents: Vec<Agent>,
}

/// HAProxy polls the agents every `agent_inter` (the agents' `agent_check_interval` too) and
/// retries `retries` times; every server UP, and polled at least once, when it returns.
pub fn tier(extra_backend: &str, agent_inter: &'static str, retries: u32) -> Tier {
    let topology = Topology::new(&["client", "lb1", "node1", "node2"]);
    let nodes = [topology.host("node1"), topology.host("node2")];
    for node in nodes {
        start_api(node, "1.0");
    }
    let agents = nodes
        .iter()
        .map(|node| {
            start_node_agent(
                node,
                &[],
                &format!("drain_timeout = \"30s\"\n{extra_backend}"),
                &format!("agent_check_interval = \"{agent_inter}\""),
            )
        })
        .collect();
    let lb_host = topology.host("lb1");
    let options = HaproxyOptions {
        agent_inter,
        retries,
        agent_check: true,
        ..HaproxyOptions::default()
    };
    let lb = Haproxy::start(lb_host, &haproxy_config_with(lb_host, &nodes, &options));
    for node in ["node1", "node2"] {
        wait_until(
            Duration::from_secs(10),
            &format!("{node} UP on HAProxy"),
            || lb.status(node) == "UP",
        );
    }
    // Let HAProxy poll each agent at least once, so they know their poller.
    let interval = humantime::parse_duration(agent_inter).expect("agent_inter is a duration");
    std::thread::sleep(interval + Duration::from_millis(500));
    Tier {
        topology,
        lb,
        agents,
    }
}
