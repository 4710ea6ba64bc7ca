//! Loads the TC programs, attaches them as links, and reads the kernel's per-backend aggregates.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use drain_agent_common::{
    counters::BackendCounters,
    flow::{COUNTED_IDLE, COUNTED_IN_FLIGHT, FLOW_ESTABLISHED, Flow, FlowKey},
    names,
};
use tracing::{debug, info, warn};

use super::{BackendSample, TrackerError, sockets};
use crate::{config::Config, status::Attachment};

/// The eBPF object, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain-agent"));

/// bpf_map_update_elem flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// First kernel with TCX links: programs attached as links detach when the agent's process
/// ends, so a crashed agent never leaves code in the node's data path.
const TCX_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);

/// Userspace's share of a backend's gauges: connections it seeded into the flow table at
/// start (positive) and flows its garbage collector removed (negative). The kernel's counters
/// are per-CPU and written without locks, so userspace keeps its share apart and adds it.
#[derive(Debug, Default, Clone, Copy)]
struct Adjustment {
    tracked: i64,
    established: i64,
    in_flight: i64,
    vanished: u64,
    cut_in_flight: u64,
}

/// The loaded and attached kernel side. Dropping it detaches everything.
pub struct EbpfTracker {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
    backends: usize,
    flow_table_size: u32,
    flow_idle_check: Duration,
    adjustments: Vec<Adjustment>,
    started: Instant,
}

impl EbpfTracker {
    /// Loads the object, fills the port map, and attaches ingress and egress classifiers to
    /// every configured interface. On any failure nothing stays attached (the `Ebpf` value,
    /// which owns the links, is dropped).
    pub fn start(config: &Config) -> Result<EbpfTracker, TrackerError> {
        let kernel = KernelVersion::current().map_err(|err| TrackerError::Read {
            what: "the kernel version",
            source: err.to_string().into(),
        })?;
        if kernel < TCX_KERNEL {
            return Err(TrackerError::KernelTooOld {
                found: format!("{kernel:?}"),
            });
        }

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::FLOWS, config.flow_table_size)
            .load(EBPF_OBJECT)
            .map_err(TrackerError::load)?;

        {
            let mut ports: Array<&mut MapData, u32> =
                Array::try_from(map_mut(&mut ebpf, names::BACKEND_BY_PORT)?).map_err(load_error)?;
            for (index, backend) in config.backends.iter().enumerate() {
                for &port in &backend.ports {
                    ports
                        .set(u32::from(port), index as u32 + 1, 0)
                        .map_err(load_error)?;
                }
            }
        }

        let mut attachments = Vec::new();
        for (program, attach_type, direction) in [
            (names::INGRESS_PROGRAM, TcAttachType::Ingress, "ingress"),
            (names::EGRESS_PROGRAM, TcAttachType::Egress, "egress"),
        ] {
            let classifier: &mut SchedClassifier = ebpf
                .program_mut(program)
                .ok_or_else(|| TrackerError::Load {
                    cause: format!("program {program} missing from the eBPF object"),
                })?
                .try_into()
                .map_err(load_error)?;
            classifier.load().map_err(load_error)?;
            let program_id = classifier.info().map_err(load_error)?.id();
            for interface in &config.interfaces {
                classifier
                    .attach(interface, attach_type)
                    .map_err(|err| TrackerError::Attach {
                        interface: interface.clone(),
                        direction,
                        source: Box::new(err),
                    })?;
                debug!(
                    interface,
                    direction, program_id, "attached TC program as a TCX link"
                );
                attachments.push(Attachment {
                    interface: interface.clone(),
                    direction: direction.to_string(),
                    program_id,
                });
            }
        }
        info!(
            interfaces = ?config.interfaces,
            backends = config.backends.len(),
            flow_table_size = config.flow_table_size,
            "kernel programs attached"
        );

        Ok(EbpfTracker {
            ebpf,
            attachments,
            backends: config.backends.len(),
            flow_table_size: config.flow_table_size,
            flow_idle_check: config.flow_idle_check,
            adjustments: vec![Adjustment::default(); config.backends.len()],
            started: Instant::now(),
        }
        .with_existing_connections(config))
    }

    /// Adds the connections that were established before the programs were attached, from
    /// the socket table: without them a restarted agent would undercount and could call a
    /// node drained while an older connection still carries a request. They start with
    /// unknown sequence numbers, which their first segment in each direction sets.
    fn with_existing_connections(mut self, config: &Config) -> EbpfTracker {
        let sockets = match sockets::tcp_sockets() {
            Ok(sockets) => sockets,
            Err(err) => {
                warn!(%err, "cannot read the socket table: connections older than the agent are not counted");
                return self;
            }
        };
        let Ok(flows) = map_mut(&mut self.ebpf, names::FLOWS) else {
            return self;
        };
        let Ok(mut flows) = HashMap::<&mut MapData, FlowKey, Flow>::try_from(flows) else {
            return self;
        };
        let now = monotonic_now();
        let mut seeded = 0;
        for socket in sockets {
            if socket.state != procfs::net::TcpState::Established {
                continue;
            }
            let Some(backend) = config.backend_of_port(socket.local.port()) else {
                continue;
            };
            let (server_addr, server_port) = sockets::to_flow_bytes(socket.local);
            let (client_addr, client_port) = sockets::to_flow_bytes(socket.remote);
            let key = FlowKey {
                client_addr,
                server_addr,
                client_port,
                server_port,
            };
            // Unread request bytes or unacknowledged response bytes: in flight now.
            let busy = socket.rx_queue > 0 || socket.tx_queue > 0;
            let flow = Flow {
                backend: backend as u32,
                state: FLOW_ESTABLISHED,
                request_pending: u32::from(busy),
                client_unsynced: 1,
                server_unsynced: 1,
                counted_in_flight: if busy {
                    COUNTED_IN_FLIGHT
                } else {
                    COUNTED_IDLE
                },
                last_seen_ns: now,
                ..Flow::default()
            };
            // NOEXIST: a connection the programs already track (handshake seen) stays theirs.
            if flows.insert(key, flow, BPF_NOEXIST).is_err() {
                continue;
            }
            let adjustment = &mut self.adjustments[backend];
            adjustment.tracked += 1;
            adjustment.established += 1;
            adjustment.in_flight += i64::from(busy);
            seeded += 1;
        }
        if seeded > 0 {
            info!(
                seeded,
                "counted connections established before the agent started"
            );
        }
        self
    }

    /// Sums the per-CPU counters of every backend: O(backends × CPUs), never the flow table.
    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        let counters: PerCpuArray<&MapData, BackendCounters> =
            PerCpuArray::try_from(map(&self.ebpf, names::BACKEND_COUNTERS)?)
                .map_err(read_error("the backend counters"))?;
        let now = monotonic_now();
        (0..self.backends)
            .map(|index| {
                let per_cpu = counters
                    .get(&(index as u32), 0)
                    .map_err(read_error("the backend counters"))?;
                let total = BackendCounters::sum(per_cpu.iter());
                let adjustment = self.adjustments[index];
                Ok(BackendSample {
                    unknown: None,
                    tracked: Some(total.tracked.wrapping_add_signed(adjustment.tracked)),
                    established: total
                        .established
                        .wrapping_add_signed(adjustment.established),
                    in_flight: Some(total.in_flight.wrapping_add_signed(adjustment.in_flight)),
                    accepted: Some(total.accepted),
                    closed: Some(total.closed),
                    reset_by_client: Some(total.reset_by_client),
                    reset_by_server: Some(total.reset_by_server),
                    flow_table_full: Some(total.flow_table_full),
                    vanished: Some(total.vanished + adjustment.vanished),
                    cut_in_flight: Some(total.cut_in_flight + adjustment.cut_in_flight),
                    since_last_idle: (total.last_idle_ns != 0)
                        .then(|| Duration::from_nanos(now.saturating_sub(total.last_idle_ns))),
                })
            })
            .collect()
    }

    /// Where the programs are attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Size of the flow table.
    pub fn flow_table_size(&self) -> u32 {
        self.flow_table_size
    }

    /// Removes flows that have been silent for `flow_idle_check` and whose socket no longer
    /// exists (the node's TCP stack dropped them without a FIN or RST on the wire, e.g. after
    /// retransmission timeouts). Without this a vanished connection would count as established
    /// (or in flight) forever and hold a drain.
    pub fn collect_garbage(&mut self) -> Result<u64, TrackerError> {
        // Grace for sockets still starting up: a flow younger than its check period stays.
        if self.started.elapsed() < self.flow_idle_check {
            return Ok(0);
        }
        let now = monotonic_now();
        let idle_check = self.flow_idle_check.as_nanos() as u64;
        let stale: Vec<(FlowKey, Flow)> = {
            let flows: HashMap<&MapData, FlowKey, Flow> =
                HashMap::try_from(map(&self.ebpf, names::FLOWS)?)
                    .map_err(read_error("the flow table"))?;
            flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, flow)| now.saturating_sub(flow.last_seen_ns) >= idle_check)
                .collect()
        };
        if stale.is_empty() {
            return Ok(0);
        }
        let live: HashSet<(SocketAddr, SocketAddr)> = sockets::tcp_sockets()?
            .into_iter()
            .filter(|socket| sockets::is_connected(&socket.state))
            .map(|socket| (socket.local, socket.remote))
            .collect();

        let mut flows: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(map_mut(&mut self.ebpf, names::FLOWS)?)
                .map_err(read_error("the flow table"))?;
        let mut removed = 0;
        for (key, flow) in stale {
            let local = sockets::from_flow_bytes(key.server_addr, key.server_port);
            let remote = sockets::from_flow_bytes(key.client_addr, key.client_port);
            if live.contains(&(local, remote)) {
                continue;
            }
            // The kernel may have removed it meanwhile (FIN/RST): then it did the accounting.
            if flows.remove(&key).is_err() {
                continue;
            }
            let Some(adjustment) = self.adjustments.get_mut(flow.backend as usize) else {
                continue;
            };
            adjustment.tracked -= 1;
            if flow.state == FLOW_ESTABLISHED {
                adjustment.established -= 1;
                adjustment.vanished += 1;
            }
            if flow.counted_in_flight == COUNTED_IN_FLIGHT {
                adjustment.in_flight -= 1;
                adjustment.cut_in_flight += 1;
            }
            removed += 1;
            warn!(%local, %remote, "removed a tracked connection whose socket is gone");
        }
        Ok(removed)
    }
}

fn map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, TrackerError> {
    ebpf.map(name).ok_or_else(|| TrackerError::Load {
        cause: format!("map {name} missing from the eBPF object"),
    })
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, TrackerError> {
    ebpf.map_mut(name).ok_or_else(|| TrackerError::Load {
        cause: format!("map {name} missing from the eBPF object"),
    })
}

fn load_error(err: impl std::error::Error) -> TrackerError {
    TrackerError::load(err)
}

fn read_error<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl Fn(E) -> TrackerError {
    move |err| TrackerError::Read {
        what,
        source: Box::new(err),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_ns and its coarse variant read.
pub fn monotonic_now() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    now.as_nanos() as u64
}
