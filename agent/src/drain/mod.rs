//! Draining a backend and cycling it (drain → restart → verify → back in service), and
//! handing it over to a new version on the same node.

pub mod handover;
pub mod operation;
pub mod phase;
pub mod reconcile;
pub mod report;

pub use operation::{Kind, Operations, Refusal};
pub use phase::{Board, Phase};
pub use report::{Outcome, Progress, Report};
