//! Prometheus metrics (`metrics_listen`): the registry the agent feeds, and the HTTP endpoint
//! that serves it with `/live` and `/ready`.

mod endpoint;
mod registry;

pub use endpoint::serve;
pub use registry::Metrics;
