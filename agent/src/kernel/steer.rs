//! The handover's steering, userspace side: attaches the `sk_lookup` program to the agent's
//! network namespace (as a link: it goes with the agent, and the kernel's own lookup takes
//! over), and writes where each backend's new connections go (docs/handover.md).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, SockHash},
    programs::SkLookup,
};
use drain_agent_common::{
    names,
    steer::{Steering, socket_key},
};
use tracing::debug;

use super::{
    TrackerError,
    ebpf::{load_error, map_mut, program_mut},
    features::{self, Feature},
};
use crate::{config::Config, status::Attachment};

/// Whether any backend hands over: only then is the program attached.
pub fn wanted(config: &Config) -> bool {
    config
        .backends
        .iter()
        .any(|backend| backend.handover.is_some())
}

/// Loads the program and attaches it to this network namespace.
pub fn attach(ebpf: &mut Ebpf) -> Result<Attachment, TrackerError> {
    let program: &mut SkLookup = program_mut(ebpf, names::STEER_PROGRAM)?;
    program
        .load()
        .map_err(|err| features::load_failure(Feature::Handover, err))?;
    let program_id = program.info().map_err(load_error)?.id();
    let netns = File::open("/proc/self/ns/net").map_err(|err| TrackerError::Attach {
        interface: "network namespace".to_string(),
        direction: "sk_lookup",
        source: Box::new(err),
    })?;
    program
        .attach(netns.as_fd())
        .map_err(|err| TrackerError::Attach {
            interface: "network namespace".to_string(),
            direction: "sk_lookup",
            source: Box::new(err),
        })?;
    debug!(
        program_id,
        "attached the handover's sk_lookup program as a link"
    );
    Ok(Attachment {
        interface: "netns".to_string(),
        direction: "steer".to_string(),
        program_id,
        mode: None,
        why: None,
    })
}

/// Writes backend `index`'s steering.
pub fn set(ebpf: &mut Ebpf, index: usize, steering: Steering) -> Result<(), TrackerError> {
    let mut map: Array<&mut MapData, Steering> =
        Array::try_from(map_mut(ebpf, names::STEERING)?).map_err(load_error)?;
    map.set(index as u32, steering, 0).map_err(load_error)
}

/// Puts a listening socket in the steering map as `instance`'s listener of `port`.
pub fn add_socket(
    ebpf: &mut Ebpf,
    port: u16,
    ipv6: bool,
    instance: u32,
    socket: &std::os::fd::OwnedFd,
) -> Result<(), TrackerError> {
    let mut map: SockHash<&mut MapData, u32> =
        SockHash::try_from(map_mut(ebpf, names::STEER_SOCKETS)?).map_err(load_error)?;
    map.insert(socket_key(port, ipv6, instance), socket.as_raw_fd(), 0)
        .map_err(load_error)
}

/// Takes `instance`'s listener of `port` out of the steering map (absent is fine).
pub fn remove_socket(
    ebpf: &mut Ebpf,
    port: u16,
    ipv6: bool,
    instance: u32,
) -> Result<(), TrackerError> {
    let mut map: SockHash<&mut MapData, u32> =
        SockHash::try_from(map_mut(ebpf, names::STEER_SOCKETS)?).map_err(load_error)?;
    match map.remove(&socket_key(port, ipv6, instance)) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(err))
            if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(err) => Err(load_error(err)),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr, TcpListener},
        os::fd::{AsFd, AsRawFd, BorrowedFd},
    };

    use super::*;

    const PORT: u16 = 8774;
    const SK_PASS: u32 = 1;
    const PROBE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 86);

    /// The shipped object with the steering program loaded (not attached), backend 0 on
    /// PORT.
    fn steering_program() -> Ebpf {
        let mut ebpf = super::super::ebpf::test_object(PORT);
        let program: &mut SkLookup = program_mut(&mut ebpf, names::STEER_PROGRAM).unwrap();
        program.load().unwrap();
        ebpf
    }

    /// A `struct bpf_sk_lookup` for a TCP (or UDP) SYN from `remote` to `local_port`.
    fn lookup_context(remote: SocketAddr, local_port: u16, tcp: bool) -> [u8; 72] {
        let mut ctx = [0u8; 72];
        let (family, remote_port) = match remote {
            SocketAddr::V4(v4) => {
                ctx[16..20].copy_from_slice(&v4.ip().octets());
                ctx[40..44].copy_from_slice(&[10, 0, 0, 2]);
                (2u32, v4.port())
            }
            SocketAddr::V6(v6) => {
                ctx[20..36].copy_from_slice(&v6.ip().octets());
                ctx[59] = 1;
                (10u32, v6.port())
            }
        };
        ctx[8..12].copy_from_slice(&family.to_ne_bytes());
        ctx[12..16].copy_from_slice(&(if tcp { 6u32 } else { 17 }).to_ne_bytes());
        ctx[36..38].copy_from_slice(&remote_port.to_be_bytes());
        ctx[60..64].copy_from_slice(&u32::from(local_port).to_ne_bytes());
        ctx
    }

    /// Runs the program on `ctx` (BPF_PROG_TEST_RUN, which aya 0.14 offers for packet
    /// programs only); returns its verdict and the cookie of the socket it selected (0: none).
    fn run(ebpf: &Ebpf, ctx: [u8; 72]) -> (u32, u64) {
        let program: &SkLookup = ebpf
            .program(names::STEER_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let fd = program.fd().unwrap().as_fd().as_raw_fd();
        let mut out = [0u8; 72];
        // union bpf_attr's `test` member.
        let mut attr = [0u64; 16];
        attr[0] = fd as u64; // prog_fd; retval in the upper half
        // ctx_size_in, ctx_size_out at byte 40; ctx_in, ctx_out at 48, 56. repeat = 1.
        attr[4] = 1; // repeat (duration in the upper half)
        attr[5] = 72 | (72 << 32);
        attr[6] = ctx.as_ptr() as u64;
        attr[7] = out.as_mut_ptr() as u64;
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: `attr` is a valid bpf_attr for this command, its pointers live through
        // the call, and the kernel writes only within the sizes given.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
        let retval = (attr[0] >> 32) as u32;
        (retval, u64::from_ne_bytes(out[0..8].try_into().unwrap()))
    }

    fn cookie(socket: BorrowedFd<'_>) -> u64 {
        let mut cookie = 0u64;
        let mut size = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid socket fd and an out-buffer of the size given.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut size,
            )
        };
        assert_eq!(result, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
        cookie
    }

    fn listener(address: &str) -> TcpListener {
        TcpListener::bind(address).expect("bind a test listener")
    }

    #[test]
    fn steering_assigns_clients_and_probes_to_their_instance_and_passes_otherwise() {
        let mut ebpf = steering_program();
        // Slot 0: an IPv4 listener. Slot 1: a dual-stack IPv6 one only, as gunicorn's
        // `[::]:PORT`, which must take IPv4 connections too.
        let old = listener("127.0.0.1:0");
        let new = listener("[::]:0");
        for (socket, ipv6, instance) in [(&old, false, 0), (&new, true, 1)] {
            let copy = socket.as_fd().try_clone_to_owned().unwrap();
            add_socket(&mut ebpf, PORT, ipv6, instance, &copy).unwrap();
        }
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let probe = SocketAddr::new(PROBE.into(), 40001);

        // Inactive: the kernel's own lookup decides.
        assert_eq!(run(&ebpf, lookup_context(client, PORT, true)), (SK_PASS, 0));

        let steer = |ebpf: &mut Ebpf, clients| {
            set(
                ebpf,
                0,
                Steering {
                    active: 1,
                    clients,
                    probes: 1,
                    probe_v4: u32::from_ne_bytes(PROBE.octets()),
                },
            )
            .unwrap()
        };
        steer(&mut ebpf, 0);
        assert_eq!(
            run(&ebpf, lookup_context(client, PORT, true)),
            (SK_PASS, cookie(old.as_fd()))
        );
        assert_eq!(
            run(&ebpf, lookup_context(probe, PORT, true)),
            (SK_PASS, cookie(new.as_fd())),
            "a probe goes to the new version (its dual-stack listener)"
        );
        // Another port, or UDP: untouched.
        assert_eq!(
            run(&ebpf, lookup_context(client, PORT + 1, true)),
            (SK_PASS, 0)
        );
        assert_eq!(
            run(&ebpf, lookup_context(client, PORT, false)),
            (SK_PASS, 0)
        );

        // Switched: clients go to the new version too, over IPv6 as well.
        steer(&mut ebpf, 1);
        assert_eq!(
            run(&ebpf, lookup_context(client, PORT, true)),
            (SK_PASS, cookie(new.as_fd()))
        );
        let client6: SocketAddr = "[2001:db8::1]:40002".parse().unwrap();
        assert_eq!(
            run(&ebpf, lookup_context(client6, PORT, true)),
            (SK_PASS, cookie(new.as_fd()))
        );

        // A slot whose socket is gone: the kernel's own lookup.
        remove_socket(&mut ebpf, PORT, true, 1).unwrap();
        assert_eq!(run(&ebpf, lookup_context(client, PORT, true)), (SK_PASS, 0));
    }
}
