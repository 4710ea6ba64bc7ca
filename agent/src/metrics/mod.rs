//! Prometheus metrics (`metrics_listen`): the registry the agent feeds, the process metrics,
//! the two text formats, and the HTTP endpoint that serves them with `/live` and `/ready`.

mod endpoint;
mod exposition;
mod process;
mod registry;

pub use endpoint::serve;
pub use registry::{Metrics, OPERATIONS, OUTCOMES, outcome_label};
