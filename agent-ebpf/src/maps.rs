//! The maps shared with userspace. Their names are `drain_agent_common::names`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use drain_agent_common::{
    DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS,
    counters::BackendCounters,
    flow::{Flow, FlowKey},
};

/// Local port → backend index + 1 (0: not watched). An array so that rejecting a packet of an
/// unwatched port costs one direct lookup.
#[map]
pub static BACKEND_BY_PORT: Array<u32> = Array::with_max_entries(65536, 0);

/// Tracked connections. A plain hash map, not LRU: an LRU map would silently evict live
/// connections; here a failed insert is counted as `flow_table_full`. Userspace resizes it
/// from `flow_table_size` at load time.
#[map]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Per-backend aggregates, per CPU so that the hot path needs no atomics on shared counters.
#[map]
pub static BACKEND_COUNTERS: PerCpuArray<BackendCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
