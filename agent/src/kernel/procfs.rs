//! Degraded mode: established connections per backend from the socket table. No kernel
//! programs, so in-flight, idle and the totals are unknown (`null` in status).

use procfs::net::TcpState;

use super::{BackendSample, TrackerError, sockets};
use crate::config::{Backend, Config};

/// Counts established sockets on the configured addresses and ports.
pub struct ProcfsTracker {
    backends: Vec<Backend>,
}

impl ProcfsTracker {
    pub fn new(config: &Config) -> ProcfsTracker {
        ProcfsTracker {
            backends: config.backends.clone(),
        }
    }

    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        let mut samples = vec![BackendSample::default(); self.backends.len()];
        for socket in sockets::tcp_sockets()? {
            if socket.state != TcpState::Established {
                continue;
            }
            if let Some(backend) = self
                .backends
                .iter()
                .position(|backend| backend.serves(socket.local))
            {
                samples[backend].established += 1;
            }
        }
        // Without the kernel programs nothing is known about any connection.
        for sample in &mut samples {
            sample.unknown = Some(sample.established);
        }
        Ok(samples)
    }
}
