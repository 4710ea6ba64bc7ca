//! The maps shared with userspace. Their names are `drain_agent_common::names`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use drain_agent_common::{
    DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS,
    backend::{MAX_SERVICE_ADDRESSES, ServiceAddress},
    counters::BackendCounters,
    flow::{Flow, FlowKey},
    gate::{AllowedSource, Gate, GateCounters, MAX_ALLOWED_SOURCES},
    steer::{INSTANCES, Steering},
};

/// Local port → backend index + 1 (0: not watched), flagged `ADDRESS_BOUND` when the backend
/// listens on given addresses only. An array so that rejecting a packet of an unwatched port
/// costs one direct lookup.
#[map]
pub static BACKEND_BY_PORT: Array<u32> = Array::with_max_entries(65536, 0);

/// Local (address, port) → backend index + 1: the listen addresses of address-bound backends,
/// and the node's own addresses on the other backends' ports (for the gate). Written by
/// userspace only.
#[map]
pub static BACKEND_ADDRESSES: HashMap<ServiceAddress, u32> =
    HashMap::with_max_entries(MAX_SERVICE_ADDRESSES, 0);

/// Connections the kernel established while the agent watched: one `Flow` in each socket's own
/// storage, created at `PASSIVE_ESTABLISHED` by the `sock_ops` program and ended at the
/// kernel's change to `TCP_CLOSE` (it is freed with the socket). The packet programs find it
/// from the socket the kernel already attached to the packet — no tuple to hash, no table to
/// fill, no tuple reuse to race with (docs/accounting.md).
#[btf_map]
pub static FLOW_STORAGE: SkStorage<Flow> = SkStorage::new();

/// 1 from before the `sock_ops` program is attached until userspace has read the socket table
/// for connections older than the agent: meanwhile each connection it starts tracking is also
/// noted in `ESTABLISHED_WHILE_SEEDING`, so that seeding skips it (socket storage cannot be
/// read from userspace without the socket).
#[map]
pub static SEEDING: Array<u32> = Array::with_max_entries(1, 0);

/// The tuples established while `SEEDING` was 1. Seeding takes milliseconds; a tuple that
/// finds it full (65,536 handshakes in that window) would be seeded as unknown as well
/// (counted twice until it ends). Not preallocated: it is empty but for those milliseconds.
#[map]
pub static ESTABLISHED_WHILE_SEEDING: HashMap<FlowKey, u32> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Tuples of connections the kernel established but whose storage could not be allocated
/// (counted as `flow_table_full`): userspace seeds them from the socket table as unknown, and
/// deletes them here. Not preallocated: it is empty unless the kernel runs out of memory.
#[map]
pub static UNTRACKED: HashMap<FlowKey, u32> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Connections older than the agent, seeded by userspace, by socket cookie: the packet
/// programs read their socket's cookie (`bpf_get_socket_cookie`, in `cgroup_skb` since 4.12)
/// and userspace reads it from `sock_diag`. A cookie is unique on the host, so, unlike a
/// tuple, it needs no namespace check (`bpf_get_netns_cookie` came to `cgroup_skb` only in
/// 6.15). The programs update and may end them (mark them removed) but only userspace deletes.
/// Not preallocated: it holds only what was established when the agent started, and shrinks
/// from there.
#[map]
pub static SEEDED_FLOWS: HashMap<u64, Flow> =
    HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_PREALLOC);

/// The tuple of each seeded flow → its socket cookie, for the `sock_ops` program (which checks
/// the namespace): a new handshake on a seeded tuple means the older connection is gone.
/// Userspace inserts and deletes an entry with its seeded flow.
#[map]
pub static SEEDED_TUPLES: HashMap<FlowKey, u64> =
    HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_PREALLOC);

/// 1 while `SEEDED_FLOWS` may hold entries (userspace sets it before it seeds and clears it
/// once it deleted the last one): until then a segment without an entry in `FLOWS` costs one
/// hash lookup, not two.
#[map]
pub static SEEDED_FLOWS_IN_USE: Array<u32> = Array::with_max_entries(1, 0);

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
