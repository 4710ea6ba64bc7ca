//! Draining a backend and cycling it (drain → restart → verify → back in service).

pub mod operation;
pub mod phase;
pub mod reconcile;
pub mod report;

pub use operation::{Kind, Operations, Refusal};
pub use phase::{Board, Phase};
pub use report::{Outcome, Progress, Report};
