//! The maps shared with userspace. Their names are `drain_agent_common::names`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use drain_agent_common::{
    DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS,
    counters::BackendCounters,
    flow::{Flow, FlowKey},
    gate::{AllowedSource, Gate, GateCounters, MAX_ALLOWED_SOURCES},
    steer::{INSTANCES, Steering},
};

/// Local port → backend index + 1 (0: not watched). An array so that rejecting a packet of an
/// unwatched port costs one direct lookup.
#[map]
pub static BACKEND_BY_PORT: Array<u32> = Array::with_max_entries(65536, 0);

/// Connections the kernel established while the agent watched, created at
/// `PASSIVE_ESTABLISHED` and removed at the kernel's change to `TCP_CLOSE`, both by the
/// `sock_ops` program and nothing else. A plain hash map, not LRU: an LRU map would silently
/// evict live connections; here a failed insert is counted as `flow_table_full`. Userspace
/// resizes it from `flow_table_size` at load time.
#[map]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Connections older than the agent, seeded by userspace; the programs update and may end them
/// (mark them removed) but only userspace deletes. Not preallocated: it holds only what was
/// established when the agent started, and shrinks from there.
#[map]
pub static SEEDED_FLOWS: HashMap<FlowKey, Flow> =
    HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_PREALLOC);

/// 1 while `SEEDED_FLOWS` may hold entries (userspace sets it before it seeds and clears it
/// once it deleted the last one): until then a segment without an entry in `FLOWS` costs one
/// hash lookup, not two.
#[map]
pub static SEEDED_FLOWS_IN_USE: Array<u32> = Array::with_max_entries(1, 0);

/// Flows the state callback just ended as `vanished` → when (CLOCK_MONOTONIC ns). The kernel
/// changes the state to `TCP_CLOSE` before it sends the RST of an abort (close with unread
/// data, SO_LINGER 0), so the egress program re-counts such an ending as `reset_by_server`
/// when that RST follows. LRU: losing an old entry only loses that re-count.
#[map]
pub static JUST_ENDED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// Per-backend aggregates, per CPU so that the hot path needs no atomics on shared counters;
/// one entry per backend and instance slot (`steer::counter_slot`): a backend's totals are
/// the sum of its two, and during a handover each version has its own.
#[map]
pub static BACKEND_COUNTERS: PerCpuArray<BackendCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS * INSTANCES, 0);

/// Per backend, until when its gate refuses new connections (0: open). Written by userspace.
#[map]
pub static GATES: Array<Gate> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Per backend, the sources a closed gate still accepts (typically the load balancers, so
/// that their health checks keep working). Written by userspace at start.
#[map]
pub static GATE_ALLOW: LpmTrie<AllowedSource, u8> =
    LpmTrie::with_max_entries(MAX_ALLOWED_SOURCES, BPF_F_NO_PREALLOC);

/// Per backend, refused and allowed new connections, per CPU.
#[map]
pub static GATE_COUNTERS: PerCpuArray<GateCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// When this CPU last logged a refusal (CLOCK_MONOTONIC ns): the log's rate limit.
#[map]
pub static GATE_LOGGED_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Per backend, where new connections go during a handover. Written by userspace.
#[map]
pub static STEERING: Array<Steering> = Array::with_max_entries(MAX_BACKENDS, 0);
/// The listening sockets of both instances of the backends that hand over, by
/// `steer::socket_key`. Userspace inserts them; the kernel removes a socket that closes.
#[map]
pub static STEER_SOCKETS: SockHash<u32> = SockHash::with_max_entries(1024, 0);
/// The instance slot the steering gave a new connection, until its handshake completes.
/// LRU: a SYN that never completes must not fill it; losing an entry counts that one
/// connection under the serving slot.
#[map]
pub static STEERED: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(16384, 0);
