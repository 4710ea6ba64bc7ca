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
    ebpf::{load_error, map, map_mut, monotonic_now, program_mut, read_error},
    features::{self, Feature},
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
    let program: &mut Xdp = program_mut(ebpf, names::GATE_PROGRAM)?;
    program
        .load()
        .map_err(|err| features::load_failure(Feature::Gate, err))?;
    let program_id = program.info().map_err(load_error)?.id();
    let mut attachments = Vec::new();
    for interface in &config.interfaces {
        // veth runs native XDP, but a frame it sends back (XDP_TX) is dropped unless the peer
        // end has NAPI enabled, which this side cannot see: containers and test namespaces
        // get the generic mode, which always sends the RST.
        let driver = driver_of(interface);
        let stripped = stripped_vlans(interface);
        let native = if driver.as_deref() == Some("veth") {
            Err("veth: XDP_TX needs NAPI on the peer".to_string())
        } else if let Some(stripped) = &stripped {
            Err(stripped.clone())
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
        if let Some(stripped) = &stripped {
            warn!(interface, "the gate runs in generic mode: {stripped}");
        }
        debug!(
            interface,
            mode, program_id, "attached the gate as an XDP link"
        );
        attachments.push(Attachment {
            interface: interface.clone(),
            direction: "gate".to_string(),
            program_id,
            mode: Some(mode.to_string()),
            why: stripped,
        });
    }
    Ok(attachments)
}

/// Why native XDP on `interface` could not answer every SYN correctly: VLAN devices sit on it
/// and the NIC strips their tags on receive (`rx-vlan-offload`), so the frame native XDP sees
/// has no tag, and a RST sent back from there would leave untagged, into a void. The network
/// stack keeps a stripped tag beside the frame and puts it back on the way out, so generic
/// mode answers on the right VLAN. `None` when native mode is right (or it cannot be told:
/// then the driver's own choice stands, as before).
pub fn stripped_vlans(interface: &str) -> Option<String> {
    let vlans = vlan_devices_on(interface);
    if vlans.is_empty() {
        return None;
    }
    /// `ETHTOOL_GFLAGS` and its receive-VLAN-offload bit (linux/ethtool.h).
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    let mut value = [ETHTOOL_GFLAGS, 0u32];
    let strips = ethtool(interface, value.as_mut_ptr().cast())
        .is_none_or(|()| value[1] & ETH_FLAG_RXVLAN != 0);
    strips.then(|| {
        format!(
            "VLAN device(s) {} on {interface}, whose tags the NIC strips on receive: native XDP \
             would answer their SYNs untagged (ethtool -K {interface} rxvlan off allows native \
             mode)",
            vlans.join(", ")
        )
    })
}

/// The VLAN devices stacked on `interface` (its `upper_*` links whose type is vlan).
fn vlan_devices_on(interface: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/sys/class/net/{interface}")) else {
        return Vec::new();
    };
    let mut vlans: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("upper_")
                .map(str::to_string)
        })
        .filter(|upper| {
            std::fs::read_to_string(format!("/sys/class/net/{upper}/uevent"))
                .is_ok_and(|uevent| uevent.lines().any(|line| line == "DEVTYPE=vlan"))
        })
        .collect();
    vlans.sort();
    vlans
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
    // SAFETY: a plain C struct, zero is a valid value for every field.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(interface, (&mut info as *mut DriverInfo).cast())?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// One `SIOCETHTOOL` request on `interface`; `data` points at the command's struct, which
/// starts with its command number and which the kernel fills in.
fn ethtool(interface: &str, data: *mut libc::c_void) -> Option<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a plain C struct, zero is a valid value for every field.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    request.ifr_ifru.ifru_data = data.cast();
    // SAFETY: a socket only for the ioctl, closed by OwnedFd; the ioctl writes into `data`,
    // which the caller keeps alive across the call.
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
    Some(())
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
    use aya::programs::{TestRun, TestRunOptions};

    use super::*;

    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    const PORT: u16 = 8774;
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    /// The shipped object with the gate loaded (not attached) and backend 0 on PORT.
    fn gate_program(closed_for: Option<Duration>, allow: &[&str]) -> Ebpf {
        let mut ebpf = super::super::ebpf::test_object(PORT);
        let mut allowed: LpmTrie<&mut MapData, AllowedSource, u8> =
            LpmTrie::try_from(ebpf.map_mut(names::GATE_ALLOW).unwrap()).unwrap();
        for net in allow {
            let (bits, source) = allow_key(0, &net.parse().unwrap());
            allowed.insert(&Key::new(bits, source), 1, 0).unwrap();
        }
        if let Some(closed_for) = closed_for {
            close(&mut ebpf, 0, closed_for).unwrap();
        }
        let program: &mut Xdp = ebpf
            .program_mut(names::GATE_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        program.load().unwrap();
        ebpf
    }

    /// Runs the gate on `frame`; returns its verdict and the frame it left.
    fn run(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &Xdp = ebpf
            .program(names::GATE_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// A TCP segment from the client to PORT with `flags`, `options` bytes of TCP options
    /// and `data` bytes of payload, over IPv4 or IPv6.
    fn segment(v6: bool, flags: u8, options: usize, data: usize) -> Vec<u8> {
        let tcp_len = 20 + options;
        let mut frame = Vec::new();
        frame.extend(NODE_MAC);
        frame.extend(CLIENT_MAC);
        if v6 {
            frame.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            frame.extend(((tcp_len + data) as u16).to_be_bytes());
            frame.extend([6, 64]);
            frame.extend(
                "2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            frame.extend(
                "2001:db8::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        } else {
            frame.extend([0x08, 0x00, 0x45, 0]);
            frame.extend(((20 + tcp_len + data) as u16).to_be_bytes());
            frame.extend([0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        }
        frame.extend(40000u16.to_be_bytes());
        frame.extend(PORT.to_be_bytes());
        frame.extend(1000u32.to_be_bytes());
        frame.extend(0u32.to_be_bytes());
        frame.extend([((tcp_len / 4) as u8) << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        frame.extend(std::iter::repeat_n(1u8, options + data));
        frame
    }

    /// One's-complement sum over `bytes` folded: 0 when a checksum inside them is right.
    fn checksum_residue(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn a_syn_to_a_closed_gate_becomes_a_reset_that_acknowledges_it_over_ipv4() {
        let ebpf = gate_program(Some(Duration::from_secs(60)), &[]);
        let (verdict, reply) = run(&ebpf, &segment(false, 0x02, 20, 0));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(reply.len(), 14 + 20 + 20, "options are cut: {reply:?}");
        assert_eq!(&reply[0..6], &CLIENT_MAC, "back to the client's MAC");
        assert_eq!(&reply[6..12], &NODE_MAC);
        let ip = &reply[14..34];
        assert_eq!(&ip[12..16], &[10, 0, 0, 2], "from the node");
        assert_eq!(&ip[16..20], &[10, 0, 0, 1], "to the client");
        assert_eq!(checksum_residue(ip), 0, "IPv4 header checksum");
        let tcp = &reply[34..54];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), PORT);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), 0);
        assert_eq!(
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            1001,
            "acknowledges the SYN"
        );
        assert_eq!(tcp[13], 0x14, "RST|ACK");
        let mut pseudo = Vec::from(&ip[12..20]);
        pseudo.extend([0, 6, 0, 20]);
        pseudo.extend(tcp);
        assert_eq!(checksum_residue(&pseudo), 0, "TCP checksum");
        let sample = sample(&ebpf, 0).unwrap();
        assert_eq!((sample.refused, sample.allowed), (1, 0));
    }

    #[test]
    fn a_syn_with_data_to_a_closed_gate_becomes_a_reset_that_acknowledges_the_data_over_ipv6() {
        let ebpf = gate_program(Some(Duration::from_secs(60)), &["10.0.0.0/8"]);
        let (verdict, reply) = run(&ebpf, &segment(true, 0x02, 20, 5));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(reply.len(), 14 + 40 + 20);
        let ip = &reply[14..54];
        assert_eq!(&ip[4..6], &[0, 20], "payload length");
        let tcp = &reply[54..74];
        assert_eq!(
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            1006,
            "SYN and 5 bytes of data"
        );
        let mut pseudo = Vec::from(&ip[8..40]);
        pseudo.extend([0, 0, 0, 20, 0, 0, 0, 6]);
        pseudo.extend(tcp);
        assert_eq!(checksum_residue(&pseudo), 0, "TCP checksum");
    }

    #[test]
    fn everything_but_a_bare_syn_to_a_closed_gate_from_outside_the_allow_list_passes() {
        let closed = gate_program(Some(Duration::from_secs(60)), &["10.0.0.0/24"]);
        // The allowed source (10.0.0.1 is in 10.0.0.0/24).
        let syn = segment(false, 0x02, 20, 0);
        assert_eq!(run(&closed, &syn), (XDP_PASS, syn.clone()));
        assert_eq!(sample(&closed, 0).unwrap().allowed, 1);
        let elsewhere = gate_program(Some(Duration::from_secs(60)), &["10.1.0.0/24"]);
        for flags in [0x10, 0x12, 0x18, 0x11, 0x04] {
            let segment = segment(false, flags, 0, 10);
            assert_eq!(
                run(&elsewhere, &segment).0,
                XDP_PASS,
                "flags {flags:#x} must pass"
            );
        }
        let mut other_port = segment(false, 0x02, 20, 0);
        other_port[36..38].copy_from_slice(&9999u16.to_be_bytes());
        assert_eq!(run(&elsewhere, &other_port).0, XDP_PASS);
        let open = gate_program(None, &[]);
        assert_eq!(run(&open, &segment(true, 0x02, 20, 0)).0, XDP_PASS);
        let expired = gate_program(Some(Duration::from_nanos(1)), &[]);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(run(&expired, &segment(false, 0x02, 20, 0)).0, XDP_PASS);
        assert!(sample(&expired, 0).unwrap().expired);
    }

    /// `frame` with VLAN tags (TPID, VLAN id) inserted after the MAC addresses.
    fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
        let mut out = Vec::from(&frame[..12]);
        for &(tpid, id) in tags {
            out.extend(tpid.to_be_bytes());
            out.extend(id.to_be_bytes());
        }
        out.extend(&frame[12..]);
        out
    }

    #[test]
    fn a_tagged_syn_to_a_closed_gate_is_answered_on_its_own_vlan() {
        let ebpf = gate_program(Some(Duration::from_secs(60)), &[]);
        for (tags, v6) in [
            (vec![(0x8100, 100)], false),
            (vec![(0x88a8, 7), (0x8100, 100)], false),
            (vec![(0x8100, 100)], true),
        ] {
            let syn = tagged(&segment(v6, 0x02, 20, 0), &tags);
            let (verdict, reply) = run(&ebpf, &syn);
            assert_eq!(verdict, XDP_TX, "{tags:?} v6={v6}");
            let l3 = 14 + 4 * tags.len();
            let ip_len = if v6 { 40 } else { 20 };
            assert_eq!(reply.len(), l3 + ip_len + 20, "{tags:?}");
            assert_eq!(&reply[0..6], &CLIENT_MAC);
            assert_eq!(&reply[12..l3], &syn[12..l3], "the tags and EtherType stay");
            let tcp = &reply[l3 + ip_len..];
            assert_eq!(tcp[13], 0x14, "RST|ACK after {tags:?}");
            assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001);
        }
    }

    #[test]
    fn a_syn_to_another_address_on_the_port_passes_a_closed_gate() {
        let ebpf = gate_program(Some(Duration::from_secs(60)), &[]);
        // To 10.0.0.99: not the backend's (another listener's, or a host behind the node).
        let mut elsewhere = segment(false, 0x02, 20, 0);
        elsewhere[33] = 99;
        assert_eq!(run(&ebpf, &elsewhere), (XDP_PASS, elsewhere.clone()));
        let mut elsewhere6 = segment(true, 0x02, 20, 0);
        elsewhere6[14 + 39] = 0x99;
        assert_eq!(run(&ebpf, &elsewhere6).0, XDP_PASS);
        assert_eq!(sample(&ebpf, 0).unwrap().refused, 0);
    }

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
