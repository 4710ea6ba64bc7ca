//! Loads the kernel programs (the `sock_ops` and packet programs on the cgroup-v2 root, the
//! gate and the steering where configured), attaches them as links, and reads the kernel's
//! per-backend aggregates.

use std::{
    collections::HashSet,
    fs::File,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps},
    util::KernelVersion,
};
use drain_agent_common::{
    MAX_BACKENDS,
    counters::BackendCounters,
    flow::{
        COUNTED_IN_FLIGHT, COUNTED_REMOVED, COUNTED_UNKNOWN, FIN_FROM_CLIENT, FLOW_ESTABLISHED,
        Flow, FlowKey, ORIGIN_SEEDED,
    },
    names,
    steer::{INSTANCES, Steering, counter_slot},
};
use tracing::{debug, error, info, warn};

use super::{
    BackendSample, InstanceSample, TrackerError, backends,
    features::{self, Feature, FeatureState, FeatureStatus},
    gate, sockets, steer,
};
use crate::{config::Config, status::Attachment};

/// The eBPF object, built by build.rs from agent-ebpf.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain-agent"));

/// bpf_map_update_elem flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The oldest kernel the agent runs on: the lowest that passed `cargo xtask kernels` (Debian
/// 12's 6.1; docs/troubleshooting.md#kernels). What the accounting uses dates from 5.15
/// (`bpf_get_netns_cookie` in `sock_ops`), but below the tested floor the agent refuses
/// rather than risks the verifier's verdict. Above it, the gate and the handover are probed by
/// loading their programs (`features`), not by version.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(6, 1, 0);

/// Userspace's share of a backend instance's gauges (indexed like `BACKEND_COUNTERS`): connections it seeded into `SEEDED_FLOWS` at
/// start (positive) and seeded flows its garbage collector removed (negative). The kernel's counters
/// are per-CPU and written without locks, so userspace keeps its share apart and adds it.
#[derive(Debug, Default, Clone, Copy)]
struct Adjustment {
    tracked: i64,
    established: i64,
    in_flight: i64,
    unknown: i64,
    vanished: u64,
    cut_in_flight: u64,
}

impl Adjustment {
    fn plus(self, other: Adjustment) -> Adjustment {
        Adjustment {
            tracked: self.tracked + other.tracked,
            established: self.established + other.established,
            in_flight: self.in_flight + other.in_flight,
            unknown: self.unknown + other.unknown,
            vanished: self.vanished + other.vanished,
            cut_in_flight: self.cut_in_flight + other.cut_in_flight,
        }
    }
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
    /// The backends' addresses and ports, for seeding from the socket table and the gate.
    config: Config,
    /// Per backend on every address, the node's addresses its gate last covered.
    gate_addresses:
        std::collections::BTreeMap<usize, std::collections::BTreeSet<(std::net::IpAddr, u16)>>,
    /// The seeded flows (by socket cookie) and their tuples: `SEEDED_TUPLES` is keyed by tuple,
    /// and the log names a removed connection by its addresses.
    seeded_tuples: std::collections::HashMap<u64, FlowKey>,
    /// Per backend, the `flow_table_full` total the last seeding from the socket table
    /// covered: above it, connections went untracked and are not yet counted as unknown.
    untracked_covered: Vec<u64>,
    /// Per backend, whether it has a gate.
    gates: Vec<bool>,
    /// Per backend, its steering as last written (slot `clients` is the instance serving).
    steering: Vec<Steering>,
    /// The kernel programs' log records, until the agent's runtime takes them.
    kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What runs on this kernel: the accounting, the gate, the handover's steering.
    features: Vec<FeatureStatus>,
    /// The socket table could not be read for connections older than the agent yet.
    unseeded: bool,
}

impl EbpfTracker {
    /// Loads the object, fills the port map, attaches the `sock_ops` program to the cgroup-v2
    /// root and ingress and egress classifiers to every configured interface. On any failure
    /// nothing stays attached (the `Ebpf` value, which owns the links, is dropped).
    pub fn start(config: &Config) -> Result<EbpfTracker, TrackerError> {
        let kernel = KernelVersion::current().map_err(|err| TrackerError::Read {
            what: "the kernel version",
            source: err.to_string().into(),
        })?;
        if kernel < MIN_KERNEL {
            return Err(TrackerError::KernelTooOld {
                found: kernel.to_string(),
            });
        }

        let netns_cookie = netns_cookie()?;
        let cgroup_root = cgroup2_root()?;
        // Kernel-side log records below debug are skipped in the kernel unless the agent's
        // own log shows debug lines.
        let kernel_log_level = if tracing::enabled!(tracing::Level::DEBUG) {
            aya_log::Level::Debug
        } else {
            aya_log::Level::Info
        } as u8;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::SEEDED_FLOWS, config.flow_table_size)
            .map_max_entries(names::SEEDED_TUPLES, config.flow_table_size)
            .override_global(names::NETNS_COOKIE, &netns_cookie, true)
            .override_global(aya_log::LEVEL, &kernel_log_level, false)
            .load(EBPF_OBJECT)
            .map_err(TrackerError::load)?;

        backends::load(&mut ebpf, config)?;

        // Until the socket table is read for connections older than the agent, every
        // connection the sock_ops program starts tracking is noted, so seeding skips it.
        set_flag(&mut ebpf, names::SEEDING, true)?;
        let cgroup = File::open(&cgroup_root).map_err(|err| TrackerError::Attach {
            interface: cgroup_root.display().to_string(),
            direction: "sock_ops",
            source: Box::new(err),
        })?;
        let mut attachments = Vec::new();
        // At the sockets, not the interfaces: the kernel has found the packet's socket there,
        // and the flow lives in its storage (docs/accounting.md). Every interface, loopback
        // included, of the agent's namespace.
        for (program, attach_type, direction) in [
            (
                names::INGRESS_PROGRAM,
                CgroupSkbAttachType::Ingress,
                "ingress",
            ),
            (names::EGRESS_PROGRAM, CgroupSkbAttachType::Egress, "egress"),
        ] {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, program)?;
            program
                .load()
                .map_err(|err| features::load_failure(Feature::Accounting, err))?;
            let program_id = program.info().map_err(load_error)?.id();
            program
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(|err| TrackerError::Attach {
                    interface: cgroup_root.display().to_string(),
                    direction,
                    source: Box::new(err),
                })?;
            debug!(cgroup = %cgroup_root.display(), direction, program_id, "attached packet program as a cgroup link");
            attachments.push(Attachment {
                interface: cgroup_root.display().to_string(),
                direction: direction.to_string(),
                program_id,
                mode: None,
                why: None,
            });
        }
        // Connections start and end here: the packet programs above only follow them.
        // Attached last: a connection it starts has had every segment seen (the packet
        // programs run already), so none can be counted idle without evidence; the ones
        // established before are seeded from the socket table afterwards, as unknown.
        if let Some(delay) = test_attach_delay() {
            std::thread::sleep(delay);
        }
        {
            let program: &mut SockOps = program_mut(&mut ebpf, names::SOCK_OPS_PROGRAM)?;
            program
                .load()
                .map_err(|err| features::load_failure(Feature::Accounting, err))?;
            let program_id = program.info().map_err(load_error)?.id();
            // A link (kernel >= 5.7) detaches when the agent's process ends. Cgroup links
            // always coexist with other programs on the same cgroup (other agents, one per
            // network namespace, share the root) and refuse any attach flag: `Single` is the
            // mode that passes none.
            program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|err| TrackerError::Attach {
                    interface: cgroup_root.display().to_string(),
                    direction: "sock_ops",
                    source: Box::new(err),
                })?;
            debug!(cgroup = %cgroup_root.display(), program_id, netns_cookie, "attached sock_ops program as a cgroup link");
            attachments.push(Attachment {
                interface: cgroup_root.display().to_string(),
                direction: "sock_ops".to_string(),
                program_id,
                mode: None,
                why: None,
            });
        }
        let mut features = vec![FeatureStatus {
            feature: Feature::Accounting.name().to_string(),
            state: FeatureState::Active,
            detail: None,
        }];
        // The gate and the handover are features: where the kernel refuses one, it is
        // reported by name and the rest runs (a drain then has no gate; a handover is refused).
        let mut kernel_log = None;
        let gate = optional(Feature::Gate, gate::wanted(config), || {
            attachments.extend(gate::attach(&mut ebpf, config)?);
            kernel_log = gate::kernel_log(&mut ebpf);
            Ok(())
        })?;
        features.push(gate);
        let handover = optional(Feature::Handover, steer::wanted(config), || {
            attachments.push(steer::attach(&mut ebpf)?);
            Ok(())
        })?;
        features.push(handover);
        let gate_active = features[1].state == FeatureState::Active;
        info!(
            interfaces = ?config.interfaces,
            backends = config.backends.len(),
            flow_table_size = config.flow_table_size,
            gate = features[1].state.as_str(),
            handover = features[2].state.as_str(),
            "kernel programs attached"
        );

        EbpfTracker {
            ebpf,
            attachments,
            backends: config.backends.len(),
            flow_table_size: config.flow_table_size,
            flow_idle_check: config.flow_idle_check,
            adjustments: vec![Adjustment::default(); (MAX_BACKENDS * INSTANCES) as usize],
            steering: vec![Steering::default(); config.backends.len()],
            started: Instant::now(),
            config: config.clone(),
            gate_addresses: std::collections::BTreeMap::new(),
            seeded_tuples: std::collections::HashMap::new(),
            untracked_covered: vec![0; config.backends.len()],
            gates: config
                .backends
                .iter()
                .map(|backend| gate_active && backend.gate.is_some())
                .collect(),
            features,
            unseeded: false,
            kernel_log,
        }
        .with_existing_connections()
    }

    /// Whether connections went untracked (no storage for them) since the last seeding.
    pub fn untracked_pending(&self) -> Result<bool, TrackerError> {
        Ok(self.sample()?.iter().any(|sample| sample.untracked_pending))
    }

    /// The fallback for connections the kernel established but could not give storage (the
    /// kernel was out of memory): they are taken from the socket table into `SEEDED_FLOWS` as
    /// unknown, exactly like connections older than the agent, so a drain waits for evidence
    /// about them instead of trusting a count that missed them (docs/accounting.md). Returns
    /// how many were added.
    pub fn seed_untracked(&mut self) -> Result<usize, TrackerError> {
        if self.unseeded {
            // The first reading of the socket table failed: that one covers these too.
            return self.seed_existing();
        }
        let totals: Vec<u64> = self
            .sample()?
            .iter()
            .map(|sample| sample.flow_table_full.unwrap_or(0))
            .collect();
        // Read first: a failed read leaves the tuples (and the pending state) for the next try.
        let sockets = sockets::tcp_sockets()?;
        let untracked = self.take_keys(names::UNTRACKED)?;
        let seeded = self.seed(sockets, Seed::Only(&untracked));
        self.untracked_covered = totals;
        if seeded > 0 {
            warn!(
                seeded,
                "connections the kernel could not give storage are counted as unknown from the \
                 socket table"
            );
        }
        Ok(seeded)
    }

    /// Adds the connections that were established before the programs were attached, from
    /// the socket table, to `SEEDED_FLOWS`: without them a restarted agent would undercount
    /// and could call a node drained while an older connection still carries a request. They
    /// start with unknown sequence numbers, which their first segment in each direction sets.
    /// The kernel never called back for them, so the packet programs end them (FIN pair,
    /// exact RST) and the garbage collector deletes them.
    fn with_existing_connections(mut self) -> Result<EbpfTracker, TrackerError> {
        self.seed_existing()?;
        Ok(self)
    }

    /// Reads the socket table and seeds the connections older than the agent. When the read
    /// fails, nothing is assumed: `SEEDING` stays on (the kernel keeps noting what it tracks
    /// itself), every backend reports no evidence (`untracked_pending`: a drain waits rather
    /// than end on "nothing left"), and the read is tried again until it succeeds.
    fn seed_existing(&mut self) -> Result<usize, TrackerError> {
        // Taken after the socket table is read: a connection established before the read and
        // after the sock_ops program was attached is in both, and is the kernel's. The flag
        // goes off first, so that the one walk empties the map for good.
        let sockets = match sockets::tcp_sockets() {
            Ok(sockets) => sockets,
            Err(err) => {
                if !self.unseeded {
                    warn!(%err, "cannot read the socket table: connections older than the agent are unknown, and no drain ends until a read succeeds (retried every half second)");
                }
                self.unseeded = true;
                return Ok(0);
            }
        };
        set_flag(&mut self.ebpf, names::SEEDING, false)?;
        let tracked = self.take_keys(names::ESTABLISHED_WHILE_SEEDING)?;
        let seeded = self.seed(sockets, Seed::Except(&tracked));
        if self.unseeded {
            info!("the socket table could be read: connections older than the agent are counted");
        }
        self.unseeded = false;
        if seeded > 0 {
            info!(
                seeded,
                "counted connections established before the agent started, as unknown"
            );
        }
        Ok(seeded)
    }

    /// Removes and returns every key of one of the tuple maps the `sock_ops` program writes.
    fn take_keys(&mut self, name: &'static str) -> Result<HashSet<FlowKey>, TrackerError> {
        let mut keys: HashMap<&mut MapData, FlowKey, u32> =
            HashMap::try_from(map_mut(&mut self.ebpf, name)?).map_err(read_error(name))?;
        let taken: HashSet<FlowKey> = keys.keys().filter_map(Result::ok).collect();
        for key in &taken {
            let _ = keys.remove(key);
        }
        Ok(taken)
    }

    /// Adds the established connections on a backend port that `which` selects to
    /// `SEEDED_FLOWS`, as unknown; returns how many.
    fn seed(&mut self, sockets: Vec<sockets::Socket>, which: Seed<'_>) -> usize {
        // Before the first insert: the packet programs look in SEEDED_FLOWS only while it is
        // in use, and a segment of a just-seeded connection must find it.
        self.mark_seeded_in_use(true);
        let Ok(flows) = map_mut(&mut self.ebpf, names::SEEDED_FLOWS) else {
            return 0;
        };
        let Ok(mut flows) = HashMap::<&mut MapData, u64, Flow>::try_from(flows) else {
            return 0;
        };
        let now = monotonic_now();
        let mut seeded = 0;
        let mut not_seeded = 0;
        let mut new_tuples = Vec::new();
        for socket in sockets {
            // A half-closed connection (the client sent its FIN, the node has not answered
            // yet: CLOSE_WAIT) may carry a request as much as an established one.
            let half_closed = socket.state == procfs::net::TcpState::CloseWait;
            if socket.state != procfs::net::TcpState::Established && !half_closed {
                continue;
            }
            // By address and port: another listener's connections on the port are not the
            // backend's.
            let Some(backend) = self.config.backend_serving(socket.local) else {
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
            let wanted = match which {
                // Established after the sock_ops program was attached: the kernel's own flow.
                Seed::Except(tracked) => !tracked.contains(&key),
                Seed::Only(untracked) => untracked.contains(&key),
            };
            if !wanted {
                continue;
            }
            // Whatever its queues say now, the agent did not see its request begin: a
            // request already read and being computed shows empty queues. Unknown until its
            // traffic settles it (docs/accounting.md).
            // Counted under the instance serving now: a connection older than the agent
            // belongs to the version that was serving when the agent started.
            let slot = counter_slot(backend as u32, self.steering[backend].clients);
            let flow = Flow {
                backend: slot,
                state: FLOW_ESTABLISHED,
                origin: ORIGIN_SEEDED,
                client_unsynced: 1,
                server_unsynced: 1,
                counted_in_flight: COUNTED_UNKNOWN,
                last_seen_ns: now,
                // Its FIN was seen by the kernel before the agent: the node's FIN ends it.
                hints: if half_closed { FIN_FROM_CLIENT } else { 0 },
                ..Flow::default()
            };
            if flows.insert(socket.cookie, flow, BPF_NOEXIST).is_err() {
                // Already seeded (a second seeding of the same untracked socket) or no room.
                not_seeded += 1;
                continue;
            }
            self.seeded_tuples.insert(socket.cookie, key);
            new_tuples.push((socket.cookie, key));
            let adjustment = &mut self.adjustments[slot as usize];
            adjustment.tracked += 1;
            adjustment.established += 1;
            adjustment.unknown += 1;
            seeded += 1;
        }
        self.index_seeded_tuples(&new_tuples);
        if not_seeded > 0 {
            warn!(
                not_seeded,
                capacity = self.flow_table_size,
                "connections could not be seeded into the table of connections older than the \
                 agent (full, or already there): those not there are not counted; raise \
                 flow_table_size"
            );
        }
        self.release_seeded_if_empty();
        seeded
    }

    /// Writes `SEEDED_TUPLES` (tuple → cookie) for flows just seeded, for the `sock_ops`
    /// program: a handshake on a seeded tuple ends the older connection. A tuple that does not
    /// fit only loses that shortcut: the garbage collector still finds the socket gone.
    fn index_seeded_tuples(&mut self, new: &[(u64, FlowKey)]) {
        let Ok(tuples) = map_mut(&mut self.ebpf, names::SEEDED_TUPLES) else {
            return;
        };
        let Ok(mut tuples) = HashMap::<&mut MapData, FlowKey, u64>::try_from(tuples) else {
            return;
        };
        for (cookie, key) in new {
            let _ = tuples.insert(key, cookie, 0);
        }
    }

    /// Tells the packet programs whether `SEEDED_FLOWS` may hold entries: while it does not,
    /// a packet of a socket without storage (a listener's, a handshake's) costs no hash
    /// lookup. Only userspace inserts there, so it always knows.
    fn mark_seeded_in_use(&mut self, in_use: bool) {
        if let Err(err) = set_flag(&mut self.ebpf, names::SEEDED_FLOWS_IN_USE, in_use) {
            // A one-entry array of this object: failing means the object itself is broken.
            warn!(%err, "cannot update the seeded-flows flag");
        }
    }

    /// Clears the flag once every seeded entry is deleted.
    fn release_seeded_if_empty(&mut self) {
        if self
            .adjustments
            .iter()
            .all(|adjustment| adjustment.tracked == 0)
        {
            self.mark_seeded_in_use(false);
        }
    }

    /// Sums the per-CPU counters of every backend: O(backends × CPUs), never a flow map.
    pub fn sample(&self) -> Result<Vec<BackendSample>, TrackerError> {
        let counters: PerCpuArray<&MapData, BackendCounters> =
            PerCpuArray::try_from(map(&self.ebpf, names::BACKEND_COUNTERS)?)
                .map_err(read_error("the backend counters"))?;
        let now = monotonic_now();
        (0..self.backends)
            .map(|index| {
                let mut total = BackendCounters::default();
                let mut adjustment = Adjustment::default();
                let mut instances = Vec::new();
                for instance in 0..INSTANCES {
                    let slot = counter_slot(index as u32, instance);
                    let per_cpu = counters
                        .get(&slot, 0)
                        .map_err(read_error("the backend counters"))?;
                    let counted = BackendCounters::sum(per_cpu.iter());
                    let share = self.adjustments[slot as usize];
                    instances.push(InstanceSample {
                        established: counted.established.wrapping_add_signed(share.established),
                        in_flight: counted.in_flight.wrapping_add_signed(share.in_flight),
                        unknown: counted.unknown.wrapping_add_signed(share.unknown),
                        accepted: counted.accepted,
                        since_last_idle: (counted.last_idle_ns != 0).then(|| {
                            Duration::from_nanos(now.saturating_sub(counted.last_idle_ns))
                        }),
                    });
                    total = BackendCounters::sum([&total, &counted]);
                    adjustment = adjustment.plus(share);
                }
                Ok(BackendSample {
                    untracked_pending: self.unseeded
                        || total.flow_table_full > self.untracked_covered[index],
                    unknown: Some(total.unknown.wrapping_add_signed(adjustment.unknown)),
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
                    gate: self.gates[index]
                        .then(|| gate::sample(&self.ebpf, index))
                        .transpose()?,
                    instances,
                    serving_instance: self.steering[index].clients,
                })
            })
            .collect()
    }

    /// Where the programs are attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Which features run on this kernel.
    pub fn features(&self) -> &[FeatureStatus] {
        &self.features
    }

    /// Closes backend `index`'s gate for at most `deadline`; `Ok(false)` when it has none.
    pub fn close_gate(&mut self, index: usize, deadline: Duration) -> Result<bool, TrackerError> {
        if !self.gates.get(index).copied().unwrap_or(false) {
            return Ok(false);
        }
        // The node's addresses as they are now: the gate refuses only what is addressed to it.
        backends::refresh_node_addresses(
            &mut self.ebpf,
            &self.config,
            index,
            &mut self.gate_addresses,
        )?;
        gate::close(&mut self.ebpf, index, deadline)?;
        Ok(true)
    }

    /// Opens backend `index`'s gate; `Ok(false)` when it has none.
    pub fn open_gate(&mut self, index: usize) -> Result<bool, TrackerError> {
        if !self.gates.get(index).copied().unwrap_or(false) {
            return Ok(false);
        }
        gate::open(&mut self.ebpf, index)?;
        Ok(true)
    }

    /// Writes backend `index`'s steering (what the `sk_lookup` program follows, and which
    /// instance new connections are counted under).
    pub fn steer(&mut self, index: usize, steering: Steering) -> Result<(), TrackerError> {
        steer::set(&mut self.ebpf, index, steering)?;
        self.steering[index] = steering;
        Ok(())
    }

    /// Puts (`Some`) or takes (`None`) an instance's listener of `port` in the steering map.
    pub fn steer_socket(
        &mut self,
        port: u16,
        ipv6: bool,
        instance: u32,
        socket: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(), TrackerError> {
        match socket {
            Some(socket) => steer::add_socket(&mut self.ebpf, port, ipv6, instance, socket),
            None => steer::remove_socket(&mut self.ebpf, port, ipv6, instance),
        }
    }

    /// The kernel programs' log records, once (the agent's runtime reads them).
    pub fn take_kernel_log(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.kernel_log.take()
    }

    /// Size of the seeded table (`flow_table_size`).
    pub fn flow_table_size(&self) -> u32 {
        self.flow_table_size
    }

    /// Entries of `SEEDED_FLOWS`: userspace inserted and deletes every one.
    pub fn seeded_entries(&self) -> u64 {
        let entries: i64 = self
            .adjustments
            .iter()
            .map(|adjustment| adjustment.tracked)
            .sum();
        entries.max(0) as u64
    }

    /// Deletes seeded flows (connections older than the agent) that are over: those the TC
    /// programs ended (FIN pair, exact RST) or a new handshake on their tuple replaced, and
    /// those silent for `flow_idle_check` whose socket no longer exists (the kernel gave up
    /// on them without a FIN or RST on the wire). Flows the kernel established while the agent
    /// watched are never touched here: the kernel's state callback ends them.
    ///
    /// Each delete is an atomic lookup-and-delete, so the accounting uses the value actually
    /// removed: if a program ended the flow meanwhile, the value says so and it is not counted
    /// twice.
    pub fn collect_garbage(&mut self) -> Result<u64, TrackerError> {
        let candidates = self.garbage_candidates()?;
        let live = candidates
            .socket_table_needed()
            .then(live_sockets)
            .transpose()?;
        self.remove_garbage(candidates, live.unwrap_or_default())
    }

    /// The first half of a collection, under the tracker's lock but without reading the
    /// socket table: seeded entries ended by the programs, and those silent for
    /// `flow_idle_check`.
    pub fn garbage_candidates(&self) -> Result<GarbageCandidates, TrackerError> {
        let now = monotonic_now();
        let idle_check = self.flow_idle_check.as_nanos() as u64;
        // Grace for the socket table: seeded sockets existed at start, but a check right
        // after start has nothing to gain.
        let check_silent = self.started.elapsed() >= self.flow_idle_check;
        type Entries = Vec<(u64, Flow)>;
        let (ended, silent): (Entries, Entries) = {
            let flows: HashMap<&MapData, u64, Flow> =
                HashMap::try_from(map(&self.ebpf, names::SEEDED_FLOWS)?)
                    .map_err(read_error("the seeded flow table"))?;
            flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, flow)| {
                    flow.counted_in_flight == COUNTED_REMOVED
                        || (check_silent && now.saturating_sub(flow.last_seen_ns) >= idle_check)
                })
                .partition(|(_, flow)| flow.counted_in_flight == COUNTED_REMOVED)
        };
        Ok(GarbageCandidates { ended, silent })
    }

    /// The second half: deletes the ended entries and the silent ones whose socket is not in
    /// `live` (read by the caller without holding the tracker's lock).
    pub fn remove_garbage(
        &mut self,
        candidates: GarbageCandidates,
        live: HashSet<u64>,
    ) -> Result<u64, TrackerError> {
        let GarbageCandidates { ended, silent } = candidates;
        if ended.is_empty() && silent.is_empty() {
            return Ok(0);
        }
        let fd = map_fd(map(&self.ebpf, names::SEEDED_FLOWS)?)?;
        let mut removed = 0;
        for (cookie, _) in ended.into_iter().chain(
            silent
                .into_iter()
                .filter(|(cookie, _)| !live.contains(cookie)),
        ) {
            let Some(flow) = lookup_and_delete(fd, &cookie)? else {
                continue;
            };
            let key = self.seeded_tuples.remove(&cookie);
            if let Some(key) = &key {
                self.forget_seeded_tuple(key, cookie);
            }
            let Some(adjustment) = self.adjustments.get_mut(flow.backend as usize) else {
                continue;
            };
            adjustment.tracked -= 1;
            if flow.counted_in_flight == COUNTED_REMOVED {
                continue; // ended (and counted) by the kernel
            }
            adjustment.established -= 1;
            adjustment.vanished += 1;
            if flow.counted_in_flight == COUNTED_IN_FLIGHT {
                adjustment.in_flight -= 1;
                adjustment.cut_in_flight += 1;
            }
            if flow.counted_in_flight == COUNTED_UNKNOWN {
                adjustment.unknown -= 1;
            }
            removed += 1;
            match key {
                Some(key) => {
                    let local = sockets::from_flow_bytes(key.server_addr, key.server_port);
                    let remote = sockets::from_flow_bytes(key.client_addr, key.client_port);
                    warn!(%local, %remote, "removed a connection older than the agent whose socket is gone");
                }
                None => warn!(
                    cookie,
                    "removed a connection older than the agent whose socket is gone"
                ),
            }
        }
        self.release_seeded_if_empty();
        Ok(removed)
    }
}

impl EbpfTracker {
    /// Deletes a seeded flow's `SEEDED_TUPLES` entry, unless a later seeding of the same tuple
    /// (a newer socket) owns it now.
    fn forget_seeded_tuple(&mut self, key: &FlowKey, cookie: u64) {
        let Ok(tuples) = map_mut(&mut self.ebpf, names::SEEDED_TUPLES) else {
            return;
        };
        let Ok(mut tuples) = HashMap::<&mut MapData, FlowKey, u64>::try_from(tuples) else {
            return;
        };
        if tuples.get(key, 0).is_ok_and(|owner| owner == cookie) {
            let _ = tuples.remove(key);
        }
    }
}

/// Which established connections of the socket table a seeding adds.
#[derive(Clone, Copy)]
enum Seed<'a> {
    /// All but these (the kernel's own, established while the agent started).
    Except(&'a HashSet<FlowKey>),
    /// Only these (established but untracked).
    Only(&'a HashSet<FlowKey>),
}

/// Tests only: a pause between attaching the packet programs and the `sock_ops` program
/// (`DRAIN_AGENT_TEST_ATTACH_DELAY_MS`), so that a test can open a connection in between.
fn test_attach_delay() -> Option<Duration> {
    std::env::var("DRAIN_AGENT_TEST_ATTACH_DELAY_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// Attaches an optional feature if configured. The kernel refusing its program makes it
/// `unsupported` (logged with the verifier's reason) instead of failing the start; any other
/// failure fails it.
fn optional(
    feature: Feature,
    wanted: bool,
    attach: impl FnOnce() -> Result<(), TrackerError>,
) -> Result<FeatureStatus, TrackerError> {
    let status = |state, detail| FeatureStatus {
        feature: feature.name().to_string(),
        state,
        detail,
    };
    if !wanted {
        return Ok(status(FeatureState::NotConfigured, None));
    }
    match attach() {
        Ok(()) => Ok(status(FeatureState::Active, None)),
        Err(err @ TrackerError::Unsupported { .. }) => {
            error!(feature = feature.name(), %err, "a configured feature cannot run on this kernel: it is off, the rest runs");
            Ok(status(FeatureState::Unsupported, Some(err.to_string())))
        }
        Err(err) => Err(err),
    }
}

/// Sets a one-entry flag array of the object.
fn set_flag(ebpf: &mut Ebpf, name: &'static str, on: bool) -> Result<(), TrackerError> {
    Array::<&mut MapData, u32>::try_from(map_mut(ebpf, name)?)
        .and_then(|mut flag| flag.set(0, u32::from(on), 0))
        .map_err(load_error)
}

/// What `garbage_candidates` found; `remove_garbage` finishes with the socket table.
#[derive(Debug, Default)]
pub struct GarbageCandidates {
    ended: Vec<(u64, Flow)>,
    silent: Vec<(u64, Flow)>,
}

impl GarbageCandidates {
    /// Whether the silent ones must be checked against the socket table.
    pub fn socket_table_needed(&self) -> bool {
        !self.silent.is_empty()
    }
}

/// The cookies of this network namespace's connected sockets: what a silent seeded entry is
/// checked against. Hundreds of milliseconds at 100k sockets, so callers read it without
/// holding the tracker's lock.
pub fn live_sockets() -> Result<HashSet<u64>, TrackerError> {
    Ok(sockets::tcp_sockets()?
        .into_iter()
        .filter(|socket| sockets::is_connected(&socket.state))
        .map(|socket| socket.cookie)
        .collect())
}

/// The raw fd of a hash map.
fn map_fd(map: &Map) -> Result<RawFd, TrackerError> {
    match map {
        Map::HashMap(data) => Ok(data.fd().as_fd().as_raw_fd()),
        _ => Err(TrackerError::Load {
            cause: "the seeded flow table is not a hash map".to_string(),
        }),
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM on a hash map (kernel >= 5.14): removes `key` and returns
/// the value it held at that moment, `None` if it was gone. aya 0.14 wraps this command only
/// for queues and stacks.
fn lookup_and_delete(fd: RawFd, key: &u64) -> Result<Option<Flow>, TrackerError> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The `map_elem` member of `union bpf_attr`.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = Flow::default();
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const u64 as u64,
        value: &mut value as *mut Flow as u64,
        flags: 0,
    };
    // SAFETY: bpf(2) with a correctly laid out attribute whose key and value point to live,
    // correctly sized buffers (u64 and Flow are the map's key and value types); the
    // kernel writes at most size_of::<Flow>() bytes to `value`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(TrackerError::Read {
        what: "the seeded flow table (lookup and delete)",
        source: Box::new(err),
    })
}

/// The cookie of the agent's network namespace (SO_NETNS_COOKIE, kernel >= 5.14), which the
/// `sock_ops` program compares with `bpf_get_netns_cookie()`.
fn netns_cookie() -> Result<u64, TrackerError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|err| TrackerError::Read {
            what: "the network namespace cookie (socket)",
            source: Box::new(err),
        })?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket with a buffer of the size passed.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(TrackerError::Read {
            what: "the network namespace cookie (SO_NETNS_COOKIE)",
            source: Box::new(std::io::Error::last_os_error()),
        });
    }
    Ok(cookie)
}

/// Where the cgroup-v2 hierarchy is mounted (its root), from /proc/self/mountinfo.
fn cgroup2_root() -> Result<PathBuf, TrackerError> {
    const MOUNTINFO: &str = "/proc/self/mountinfo";
    let mountinfo = std::fs::read_to_string(MOUNTINFO).map_err(|err| TrackerError::Read {
        what: "/proc/self/mountinfo",
        source: Box::new(err),
    })?;
    cgroup2_mount(&mountinfo).ok_or(TrackerError::NoCgroup2 {
        searched: Path::new(MOUNTINFO).to_path_buf(),
    })
}

/// The mount point of the first cgroup2 mount of the hierarchy's root in `mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let (mount, fs) = line.split_once(" - ")?;
        let mut fields = mount.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fs.split(' ').next()? == "cgroup2" && root == "/").then(|| unescape(mount_point))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo (octal).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

pub(super) fn map<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<&'a aya::maps::Map, TrackerError> {
    ebpf.map(name).ok_or_else(|| TrackerError::Load {
        cause: format!("map {name} missing from the eBPF object"),
    })
}

/// For the kernel programs' unit tests: the shipped object loaded (nothing attached), with
/// backend 0 on `port`.
#[cfg(test)]
pub(super) fn test_object(port: u16) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .expect("load the eBPF object (needs root)");
    let mut ports: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut(names::BACKEND_BY_PORT).unwrap()).unwrap();
    ports.set(u32::from(port), 1, 0).unwrap();
    // The node's addresses in the tests' frames, for the gate.
    let mut addresses: HashMap<&mut MapData, drain_agent_common::backend::ServiceAddress, u32> =
        HashMap::try_from(ebpf.map_mut(names::BACKEND_ADDRESSES).unwrap()).unwrap();
    for addr in ["10.0.0.2", "2001:db8::2"] {
        addresses
            .insert(backends::key(addr.parse().unwrap(), port), 1, 0)
            .unwrap();
    }
    ebpf
}

/// A program of the object, as its type.
pub(super) fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, TrackerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| TrackerError::Load {
            cause: format!("program {name} missing from the eBPF object"),
        })?
        .try_into()
        .map_err(load_error)
}

pub(super) fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, TrackerError> {
    ebpf.map_mut(name).ok_or_else(|| TrackerError::Load {
        cause: format!("map {name} missing from the eBPF object"),
    })
}

pub(super) fn load_error(err: impl std::error::Error) -> TrackerError {
    TrackerError::load(err)
}

pub(super) fn read_error<E: std::error::Error + Send + Sync + 'static>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_the_kernel_refuses_is_unsupported_by_name_and_the_rest_runs() {
        let refused = optional(Feature::Gate, true, || {
            Err(TrackerError::Unsupported {
                feature: "gate",
                needs: Feature::Gate.needs(),
                kernel: "5.4.0".into(),
                reason: "Invalid argument; the verifier said: unknown func bpf_xdp_adjust_tail#65"
                    .into(),
            })
        })
        .expect("a refusal is not an error of the start");
        assert_eq!(refused.state, FeatureState::Unsupported);
        assert_eq!(refused.feature, "gate");
        let detail = refused.detail.expect("the reason");
        assert!(
            detail.contains("kernel 5.4.0 refused the gate programs"),
            "{detail}"
        );
        assert!(
            detail.contains("unknown func bpf_xdp_adjust_tail"),
            "{detail}"
        );
        assert!(
            detail.contains("XDP programs attached as links (Linux 5.9)"),
            "{detail}"
        );

        let other = optional(Feature::Handover, true, || {
            Err(TrackerError::Load {
                cause: "Operation not permitted".into(),
            })
        });
        assert!(other.is_err(), "any other failure fails the start");
        let unconfigured = optional(Feature::Handover, false, || unreachable!()).unwrap();
        assert_eq!(unconfigured.state, FeatureState::NotConfigured);
    }

    #[test]
    fn finds_the_cgroup2_root_in_a_hybrid_layout() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn skips_cgroup2_mounts_of_a_subtree_and_unescapes_the_path() {
        let mountinfo = "\
50 23 0:38 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
51 23 0:38 / /mnt/my\\040cgroup rw shared:5 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        assert_eq!(
            cgroup2_mount("48 45 0:39 / /sys rw,relatime - sysfs sysfs rw\n"),
            None
        );
    }
}
