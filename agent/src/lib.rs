//! drain-agent: tracks in-flight and idle connections per API backend with eBPF and (in later
//! stages) drains, restarts and restores the node behind HAProxy.

pub mod agent;
pub mod agent_check;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod drain;
pub mod drift;
pub mod haproxy;
pub mod health;
pub mod instance;
pub mod journal;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod service;
pub mod status;
