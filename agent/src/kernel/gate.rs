//! The kernel gate's userspace half: attaching the XDP program to the interfaces, loading the
//! allow lists, and closing and opening a backend's gate with a deadline the kernel enforces.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{Xdp, XdpMode},
};
use drain_agent_common::{
    gate::{ALLOW_BACKEND_BITS, ALLOW_V4_MAPPED_BITS, AllowedSource, Gate, GateCounters},
    names,
};
use tracing::{debug, warn};

use super::{
    TrackerError,
    ebpf::{load_error, map, map_mut, monotonic_now, read_error},
};
use crate::{config::Config, status::Attachment};

/// A backend's gate as the kernel sees it now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateSample {
    /// Time left until a closed gate opens by itself; `None` when open (or expired).
    pub closed_for: Option<Duration>,
    /// The agent closed it and its deadline passed before anyone opened it.
    pub expired: bool,
    /// New connections refused since the agent started.
    pub refused: u64,
    /// New connections let through a closed gate by the allow list since the agent started.
    pub allowed: u64,
}

/// Whether any backend configures a gate: only then is the XDP program attached at all.
pub fn wanted(config: &Config) -> bool {
    config.backends.iter().any(|backend| backend.gate.is_some())
}

/// Fills the allow lists and attaches the gate to every interface: natively where the driver
/// supports XDP, in generic (skb) mode otherwise. Links, like the TC programs': they detach
/// when the agent's process ends, and with them every closed gate.
pub fn attach(ebpf: &mut Ebpf, config: &Config) -> Result<Vec<Attachment>, TrackerError> {
    {
        let mut allow: LpmTrie<&mut MapData, AllowedSource, u8> =
            LpmTrie::try_from(map_mut(ebpf, names::GATE_ALLOW)?).map_err(load_error)?;
        for (index, backend) in config.backends.iter().enumerate() {
            for net in backend.gate.iter().flat_map(|gate| &gate.allow) {
                let (prefix_len, source) = allow_key(index, net);
                allow
                    .insert(&Key::new(prefix_len, source), 1, 0)
                    .map_err(load_error)?;
            }
        }
    }
    let program: &mut Xdp = ebpf
        .program_mut(names::GATE_PROGRAM)
        .ok_or_else(|| TrackerError::Load {
            cause: format!(
                "program {} missing from the eBPF object",
                names::GATE_PROGRAM
            ),
        })?
        .try_into()
        .map_err(load_error)?;
    program.load().map_err(load_error)?;
    let program_id = program.info().map_err(load_error)?.id();
    let mut attachments = Vec::new();
    for interface in &config.interfaces {
        // veth runs native XDP, but a frame it sends back (XDP_TX) is dropped unless the peer
        // end has NAPI enabled, which this side cannot see: containers and test namespaces
        // get the generic mode, which always sends the RST.
        let driver = driver_of(interface);
        let native = if driver.as_deref() == Some("veth") {
            Err("veth: XDP_TX needs NAPI on the peer".to_string())
        } else {
            program
                .attach(interface, XdpMode::Driver)
                .map_err(|err| err.to_string())
        };
        let mode = match native {
            Ok(_) => "native",
            Err(native) => {
                debug!(interface, ?driver, %native, "attaching the gate in generic mode");
                program
                    .attach(interface, XdpMode::Skb)
                    .map_err(|err| TrackerError::Attach {
                        interface: interface.clone(),
                        direction: "gate (XDP)",
                        source: Box::new(err),
                    })?;
                "generic"
            }
        };
        debug!(
            interface,
            mode, program_id, "attached the gate as an XDP link"
        );
        attachments.push(Attachment {
            interface: interface.clone(),
            direction: "gate".to_string(),
            program_id,
            mode: Some(mode.to_string()),
        });
    }
    Ok(attachments)
}

/// The interface's driver name, as `ethtool -i` shows it; `None` if it cannot be read.
fn driver_of(interface: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain C structs, zero is a valid value for every field.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    // SAFETY: a socket only for the ioctl, closed by OwnedFd; the ioctl writes into `info`,
    // which outlives the call.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return None;
        }
        let socket = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        if libc::ioctl(fd, SIOCETHTOOL, &mut request) != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The LPM-trie key of an allow-list network for backend `index`.
pub fn allow_key(index: usize, net: &ipnet::IpNet) -> (u32, AllowedSource) {
    let mut source = AllowedSource {
        backend_be: (index as u32).to_be_bytes(),
        addr: [0; 16],
    };
    let prefix_len = match net {
        ipnet::IpNet::V4(net) => {
            source.addr = net.network().to_ipv6_mapped().octets();
            ALLOW_BACKEND_BITS + ALLOW_V4_MAPPED_BITS + u32::from(net.prefix_len())
        }
        ipnet::IpNet::V6(net) => {
            source.addr = net.network().octets();
            ALLOW_BACKEND_BITS + u32::from(net.prefix_len())
        }
    };
    (prefix_len, source)
}

/// Closes backend `index`'s gate until `deadline` from now.
pub fn close(ebpf: &mut Ebpf, index: usize, deadline: Duration) -> Result<u64, TrackerError> {
    let until = monotonic_now() + deadline.as_nanos() as u64;
    set(ebpf, index, until)?;
    Ok(until)
}

/// Opens backend `index`'s gate.
pub fn open(ebpf: &mut Ebpf, index: usize) -> Result<(), TrackerError> {
    set(ebpf, index, 0)
}

fn set(ebpf: &mut Ebpf, index: usize, closed_until_ns: u64) -> Result<(), TrackerError> {
    let mut gates: Array<&mut MapData, Gate> =
        Array::try_from(map_mut(ebpf, names::GATES)?).map_err(read_error("the gates"))?;
    gates
        .set(index as u32, Gate { closed_until_ns }, 0)
        .map_err(read_error("the gates"))
}

/// Backend `index`'s gate now.
pub fn sample(ebpf: &Ebpf, index: usize) -> Result<GateSample, TrackerError> {
    let gates: Array<&MapData, Gate> =
        Array::try_from(map(ebpf, names::GATES)?).map_err(read_error("the gates"))?;
    let gate = gates
        .get(&(index as u32), 0)
        .map_err(read_error("the gates"))?;
    let counters: PerCpuArray<&MapData, GateCounters> =
        PerCpuArray::try_from(map(ebpf, names::GATE_COUNTERS)?)
            .map_err(read_error("the gate counters"))?;
    let counters = GateCounters::sum(
        counters
            .get(&(index as u32), 0)
            .map_err(read_error("the gate counters"))?
            .iter(),
    );
    let now = monotonic_now();
    let closed = gate.closed_until_ns != 0;
    Ok(GateSample {
        closed_for: (closed && gate.closed_until_ns > now)
            .then(|| Duration::from_nanos(gate.closed_until_ns - now)),
        expired: closed && gate.closed_until_ns <= now,
        refused: counters.refused,
        allowed: counters.allowed,
    })
}

/// Starts reading the kernel programs' aya-log records into the agent's log (the `log`
/// records reach tracing through its log bridge). Without a record in the object (no gate
/// code that logs) there is nothing to read.
pub fn kernel_log(ebpf: &mut Ebpf) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Some(logger),
        Err(err) => {
            warn!(%err, "kernel-side log records cannot be read; the gate works without them");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_network_is_matched_inside_the_ipv4_mapped_range_after_the_backend() {
        let (bits, source) = allow_key(2, &"10.0.0.0/24".parse().unwrap());
        assert_eq!(bits, 32 + 96 + 24);
        assert_eq!(source.backend_be, [0, 0, 0, 2]);
        assert_eq!(&source.addr[10..], &[0xff, 0xff, 10, 0, 0, 0]);
    }

    #[test]
    fn an_ipv6_network_is_matched_from_its_first_bit_after_the_backend() {
        let (bits, source) = allow_key(0, &"fd00::/64".parse().unwrap());
        assert_eq!(bits, 32 + 64);
        assert_eq!(source.addr[0], 0xfd);
    }
}
