//! drain-agent: tracks in-flight and idle connections per API backend with eBPF and (in later
//! stages) drains, restarts and restores the node behind HAProxy.

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod kernel;
pub mod logging;
pub mod status;
