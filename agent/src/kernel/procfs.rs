//! Degraded mode: established connections per backend from the socket table. No kernel
//! programs, so in-flight, idle and the totals are unknown (`null` in status).

use procfs::net::TcpState;

use super::{BackendSample, TrackerError, sockets};
use crate::config::Config;

/// Counts established sockets on the configured ports.
pub struct ProcfsTracker {
    config: Config,
}

impl ProcfsTracker {
    pub fn new(config: &Config) -> ProcfsTracker {
        ProcfsTracker {
            config: config.clone(),
        }
    }

    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        let mut samples = vec![BackendSample::default(); self.config.backends.len()];
        for socket in sockets::tcp_sockets()? {
            if socket.state != TcpState::Established {
                continue;
            }
            if let Some(backend) = self.config.backend_of_port(socket.local.port()) {
                samples[backend].established += 1;
            }
        }
        Ok(samples)
    }
}
