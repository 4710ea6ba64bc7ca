//! Wire types shared by the kernel programs (`drain-agent-ebpf`) and userspace (`drain-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit padding, and uses integer constants instead of
//! `bool`/enums so that any bit pattern the other side writes is a valid value.
#![no_std]

pub mod backend;
pub mod counters;
pub mod flow;
pub mod gate;
pub mod steer;

/// Names of the maps and programs in the eBPF object. The eBPF crate's `#[map]` statics carry
/// the same names (the macro takes a literal), and userspace looks them up through these.
pub mod names {
    /// `Array<u32>` indexed by local TCP port: 0 = not watched, otherwise backend index + 1,
    /// with `backend::ADDRESS_BOUND` set when the backend listens on given addresses only.
    pub const BACKEND_BY_PORT: &str = "BACKEND_BY_PORT";
    /// `HashMap<ServiceAddress, u32>`: local (address, port) → backend index + 1. The listen
    /// addresses of address-bound backends (what `sock_ops`, `sk_lookup` and the gate check),
    /// and, for the gate only, the node's own addresses on the other backends' ports: a
    /// closed gate refuses only SYNs addressed to the backend on this node.
    pub const BACKEND_ADDRESSES: &str = "BACKEND_ADDRESSES";
    /// `SkStorage<Flow>`: the flow of each connection the kernel established while the agent
    /// watched, in its socket's own storage; created and ended only by the `sock_ops` program.
    pub const FLOW_STORAGE: &str = "FLOW_STORAGE";
    /// `Array<u32>` of one entry: 1 while userspace reads the socket table to seed connections
    /// older than the agent.
    pub const SEEDING: &str = "SEEDING";
    /// `HashMap<FlowKey, u32>`: tuples the `sock_ops` program started tracking while
    /// `SEEDING` was 1, which seeding must skip.
    pub const ESTABLISHED_WHILE_SEEDING: &str = "ESTABLISHED_WHILE_SEEDING";
    /// `HashMap<FlowKey, u32>`: tuples established but untracked (no storage could be
    /// allocated), which userspace seeds as unknown.
    pub const UNTRACKED: &str = "UNTRACKED";
    /// `HashMap<u64, Flow>`: connections older than the agent by socket cookie, seeded by
    /// userspace from the socket table (sock_diag) at start; only userspace deletes from it.
    pub const SEEDED_FLOWS: &str = "SEEDED_FLOWS";
    /// `HashMap<FlowKey, u64>`: each seeded flow's tuple → its socket cookie, for the
    /// `sock_ops` program (a handshake on a seeded tuple ends the older connection).
    pub const SEEDED_TUPLES: &str = "SEEDED_TUPLES";
    /// `Array<u32>` of one entry: 1 while `SEEDED_FLOWS` may hold entries (set by userspace
    /// before it seeds, cleared once it deleted the last one), so that the packet programs look
    /// there only then.
    pub const SEEDED_FLOWS_IN_USE: &str = "SEEDED_FLOWS_IN_USE";
    /// `PerCpuArray<BackendCounters>` indexed by `steer::counter_slot` (backend and instance).
    pub const BACKEND_COUNTERS: &str = "BACKEND_COUNTERS";
    /// `Array<Gate>` indexed by backend index: until when new connections are refused.
    pub const GATES: &str = "GATES";
    /// `LpmTrie<AllowedSource, u8>`: per backend, the sources a closed gate still accepts.
    pub const GATE_ALLOW: &str = "GATE_ALLOW";
    /// `PerCpuArray<GateCounters>` indexed by backend index.
    pub const GATE_COUNTERS: &str = "GATE_COUNTERS";
    /// `cgroup_skb` program on the cgroup-v2 root for packets arriving at the node's sockets
    /// (client → server).
    pub const INGRESS_PROGRAM: &str = "drain_ingress";
    /// `cgroup_skb` program on the cgroup-v2 root for packets leaving them (server → client).
    pub const EGRESS_PROGRAM: &str = "drain_egress";
    /// XDP program on the interfaces of backends with a gate: refuses new connections to a
    /// closed gate's ports with a RST.
    pub const GATE_PROGRAM: &str = "drain_gate";
    /// `Array<Steering>` indexed by backend index: where new connections go during a handover.
    pub const STEERING: &str = "STEERING";
    /// `SockHash<u32>`: the listening sockets of both instances (`steer::socket_key`).
    pub const STEER_SOCKETS: &str = "STEER_SOCKETS";
    /// `LruHashMap<FlowKey, u32>`: the instance slot the `sk_lookup` program gave a SYN, read
    /// (and removed) when the handshake completes, so the flow is counted where it went.
    pub const STEERED: &str = "STEERED";
    /// `sk_lookup` program on the agent's network namespace: the handover's steering.
    pub const STEER_PROGRAM: &str = "drain_steer";
    /// `sock_ops` program on the cgroup-v2 root: where connections start and end.
    pub const SOCK_OPS_PROGRAM: &str = "drain_sock_ops";
    /// Global (`u64`) the loader sets to the agent's network namespace cookie: the `sock_ops`
    /// program sees every namespace's sockets and keeps only these.
    pub const NETNS_COOKIE: &str = "NETNS_COOKIE";
}

/// Most backends one agent can watch (size of the per-backend counter array).
pub const MAX_BACKENDS: u32 = 64;

/// Default number of connections older than the agent (or untracked) the seeded flow table
/// holds; `flow_table_size` in the config changes it. Connections established while the agent
/// watches live in their sockets' storage, which has no capacity to fill.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
