//! The old version's keep-alive connections across its stop (docs/handover.md).
//!
//! A server that stops closes its idle keep-alive connections, and a request a client sends
//! on one at that moment is lost: HTTP/1.1 has no race-free way for a server to close a
//! persistent connection, and HAProxy's pool reuses its idle connections to the old version
//! for as long as they are open. So the agent takes a copy of each of the old version's
//! connections before it stops it. A copy keeps the connection open when the old process
//! exits. What the agent may do with it then is narrow, because the old process took its
//! state with it (a TLS session, an HTTP/2 session, a half-read request):
//!
//! - Only a cleartext HTTP/1.x connection between requests can be carried on: its next bytes
//!   begin a request, which the new version can answer as well as the old one. Each request
//!   is relayed whole, head checked, body framed (Content-Length or chunked), over a
//!   connection of the agent's own to the service's address (the steering sends it to the new
//!   version), until either side closes.
//! - Anything else (the old version was in the middle of a request, or the next bytes are a
//!   TLS record, HTTP/2, or the rest of a body) is closed at once: the client sees its
//!   connection close or reset and retries, instead of another request's answer.
//! - A connection whose last response carried `Connection: close` is closed by the client,
//!   and nothing arrives on one that stays unused: both are let go.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use procfs::net::TcpState;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};
use tracing::{debug, info, warn};

use crate::{
    config::{Backend, Probe},
    kernel::listeners,
};

/// The longest request head the relay waits for: a longer one is not relayed.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size or trailer line of a chunked body.
const MAX_LINE: usize = 8 * 1024;
/// The most header fields of a request head.
const MAX_HEADERS: usize = 128;
/// The longest method: HTTP's registered methods are far shorter.
const MAX_METHOD: usize = 32;

/// One connection of the old version, held by the agent.
pub struct Held {
    local: SocketAddr,
    socket: OwnedFd,
    /// Where the old version's reading of it stood when the agent took hold.
    at_hold: Option<Reading>,
}

/// Whether a backend speaks TLS (its health check asks for https://). Its connections are not
/// relayed: their TLS sessions end with the old process, so nothing that arrives on one later
/// can be, and a copy held past the exit would only hide the FIN the old process's exit sends,
/// which is what makes HAProxy drop the connection from its pool instead of sending a request
/// on it ([`close_idle`] closes the idle ones even earlier).
pub fn speaks_tls(backend: &Backend) -> bool {
    backend.health.as_ref().is_some_and(
        |health| matches!(&health.probe, Probe::Http { url, .. } if url.scheme() == "https"),
    )
}

/// The old version's processes as they are now: `pids` (found when the handover began), the
/// processes holding its listening sockets (`listening`, inodes: workers forked since then
/// hold them too) and the descendants of all of them. The agent itself, which may hold copies
/// of the listeners, is never one of them.
pub fn processes(pids: &[i32], listening: &BTreeSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut found: BTreeSet<i32> = pids.iter().copied().collect();
    found.extend(
        listeners::holders(listening)
            .into_values()
            .flatten()
            .map(|(pid, _)| pid),
    );
    let parents: Vec<(i32, i32)> = procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|process| Some((process.pid, process.stat().ok()?.ppid)))
        .collect();
    loop {
        let before = found.len();
        for &(pid, parent) in &parents {
            if found.contains(&parent) {
                found.insert(pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&me);
    found.into_iter().collect()
}

/// Copies of every established connection the processes `pids` hold on `backend`'s addresses
/// and ports.
pub fn hold(pids: &[i32], backend: &Backend) -> Vec<Held> {
    let established: BTreeMap<u64, SocketAddr> = procfs::net::tcp()
        .into_iter()
        .chain(procfs::net::tcp6())
        .flatten()
        .filter(|entry| entry.state == TcpState::Established && backend.serves(entry.local_address))
        .map(|entry| (entry.inode, entry.local_address))
        .collect();
    let mut held = BTreeMap::new();
    for &pid in pids {
        let Ok(fds) = procfs::process::Process::new(pid).and_then(|process| process.fd()) else {
            continue;
        };
        for fd in fds.flatten() {
            let procfs::process::FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            let Some(&local) = established.get(&inode) else {
                continue;
            };
            if held.contains_key(&inode) {
                continue;
            }
            match listeners::take(local, pid, fd.fd) {
                Ok(socket) => {
                    let at_hold = reading(&socket);
                    held.insert(
                        inode,
                        Held {
                            local,
                            socket,
                            at_hold,
                        },
                    );
                }
                Err(err) => warn!(%err, "cannot hold a connection of the old version"),
            }
        }
    }
    held.into_values().collect()
}

/// Counts of what became of the held connections; they grow while the relays run.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Connections whose requests went on to the new version.
    pub relayed: Arc<AtomicU64>,
    /// Connections closed instead, because they were not between requests of cleartext
    /// HTTP/1.x.
    pub closed: Arc<AtomicU64>,
}

/// Once the old version has exited: closes at once each held connection it left in the middle
/// of a request, or whose waiting bytes do not begin an HTTP/1.x request; keeps each other one
/// open and relays its requests to the new version. A connection nothing arrives on within
/// `unused_for` is let go.
pub fn relay(held: Vec<Held>, unused_for: Duration) -> Tally {
    let tally = Tally::default();
    for Held {
        local,
        socket,
        at_hold,
    } in held
    {
        // Unless the old version stopped reading it at the end of a request, what waits on it,
        // or comes next, may be the rest of a request, and the client waits for that request's
        // answer, which only the old process could have given.
        if !at_request_boundary(at_hold, reading(&socket)) {
            close(
                &socket,
                local,
                "the old version left a request unfinished on it",
            );
            tally.closed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // What the client sent while the old version stopped, if anything: judged now, so that
        // a TLS record or HTTP/2 frames are answered by a close at once.
        if let Some(waiting) = peek_now(&socket)
            && let Head::NotARequest(why) = classify(&waiting)
        {
            close(&socket, local, why);
            tally.closed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        tokio::spawn(carry(local, socket, unused_for, tally.clone()));
    }
    tally
}

/// Whether the old version stopped reading a connection where a request ends: it read
/// nothing from it after the agent took hold, and either it was between requests then, or it
/// answered after then (a request in flight at its stop, which a graceful stop finishes) and
/// the client has all of the answer. A server that reads on after the hold (a body, or a
/// request that came during its stop) fails this: the connection is closed, never guessed.
fn at_request_boundary(at_hold: Option<Reading>, at_exit: Option<Reading>) -> bool {
    let (Some(then), Some(now)) = (at_hold, at_exit) else {
        return false;
    };
    now.consumed == then.consumed
        && (then.between_requests || (now.acked > then.acked && now.delivered))
}

/// For a backend that speaks TLS, once its old version was told to stop: shuts down each held
/// connection that is between requests, so that its FIN makes HAProxy drop it from its pool
/// now, instead of when the old process exits (a graceful stop can take seconds, and a request
/// sent meanwhile on a connection the server no longer reads is lost: gunicorn never reads its
/// idle connections after SIGTERM). Its TLS session cannot be carried on. The others are let go
/// to the old process, whose exit closes them. Returns how many were shut down.
pub fn close_idle(held: Vec<Held>) -> u64 {
    let mut closed = 0;
    for Held { local, socket, .. } in held {
        if reading(&socket).is_some_and(|reading| reading.between_requests) {
            close(
                &socket,
                local,
                "TLS between requests: its session ends with the old version",
            );
            closed += 1;
        }
    }
    closed
}

/// Relays the requests of one held connection to the new version.
async fn carry(local: SocketAddr, socket: OwnedFd, unused_for: Duration, tally: Tally) {
    let std_stream = std::net::TcpStream::from(socket);
    if std_stream.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(client) = tokio::net::TcpStream::from_std(std_stream) else {
        return;
    };
    let (read, client_write) = client.into_split();
    let mut client = Incoming {
        stream: read,
        buffer: Vec::new(),
    };
    let first = match tokio::time::timeout(unused_for, client.head()).await {
        // Nothing came, or the client closed it (it read `Connection: close`).
        Err(_) if client.buffer.is_empty() => return,
        Ok(Ok(None)) | Ok(Err(Stop::Io(_))) => return,
        Err(_) => {
            let socket = client.stream.reunite(client_write).ok();
            if let Some(socket) = &socket {
                close(socket, local, "a request head that never ended");
            }
            tally.closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Err(Stop::NotARequest(why))) => {
            if let Ok(socket) = client.stream.reunite(client_write) {
                close(&socket, local, why);
            }
            tally.closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Ok(Some(first))) => first,
    };
    // To the service's own address: the steering (or, once it is released, the only
    // listener left) takes it to the new version.
    let upstream = match tokio::net::TcpStream::connect(local).await {
        Ok(upstream) => upstream,
        Err(err) => {
            warn!(%local, %err, "cannot relay a kept-alive connection to the new version");
            return;
        }
    };
    tally.relayed.fetch_add(1, Ordering::Relaxed);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let responses = async move {
        let mut client_write = client_write;
        let copied = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied
    };
    let requests = async {
        let forwarded = forward_requests(&mut client, first, &mut upstream_write).await;
        if forwarded.is_ok() {
            // The client closed between requests: the new version answers what it has and
            // closes its side.
            let _ = upstream_write.shutdown().await;
        }
        forwarded
    };
    tokio::pin!(responses, requests);
    tokio::select! {
        copied = &mut responses => {
            debug!(%local, ?copied, "the new version closed a relayed connection");
        }
        forwarded = &mut requests => match forwarded {
            Ok(()) => {
                let copied = (&mut responses).await;
                debug!(%local, ?copied, "relayed a kept-alive connection of the old version");
            }
            Err(Stop::NotARequest(why)) => {
                info!(%local, why, "closed a relayed connection of the old version: the client \
                      sent what is not an HTTP/1.x request");
            }
            Err(Stop::Io(err)) => {
                debug!(%local, %err, "a relayed connection of the old version failed");
            }
        },
    }
}

/// Forwards requests from `client`, beginning with `first`, each whole, until the client
/// closes between two of them.
async fn forward_requests(
    client: &mut Incoming,
    first: (Vec<u8>, Body),
    upstream: &mut OwnedWriteHalf,
) -> Result<(), Stop> {
    let mut next = Some(first);
    while let Some((head, body)) = next {
        upstream.write_all(&head).await?;
        match body {
            Body::Length(length) => client.forward(length, upstream).await?,
            Body::Chunked => client.forward_chunked(upstream).await?,
            Body::Tunnel => {
                // An upgrade or CONNECT: from its answer on, the new version and the client
                // speak whatever they agreed (or HTTP/1.1 again if it declined) from a start
                // both saw, so the bytes go on as they come.
                upstream.write_all(&client.buffer).await?;
                client.buffer.clear();
                tokio::io::copy(&mut client.stream, upstream).await?;
                return Ok(());
            }
        }
        next = client.head().await?;
    }
    Ok(())
}

/// Why a relay stops.
#[derive(Debug)]
enum Stop {
    /// The client sent something else than a whole HTTP/1.x request.
    NotARequest(&'static str),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(err: io::Error) -> Stop {
        Stop::Io(err)
    }
}

/// A held connection's incoming side, with what was read but not forwarded yet.
struct Incoming {
    stream: OwnedReadHalf,
    buffer: Vec<u8>,
}

impl Incoming {
    /// Reads what arrives next into the buffer; false once the client closed.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next request's head and how its body is framed; `None` if the client closed
    /// between requests.
    async fn head(&mut self) -> Result<Option<(Vec<u8>, Body)>, Stop> {
        loop {
            if !self.buffer.is_empty() {
                match classify(&self.buffer) {
                    Head::Request { length, body } => {
                        return Ok(Some((self.buffer.drain(..length).collect(), body)));
                    }
                    Head::NotARequest(why) => return Err(Stop::NotARequest(why)),
                    Head::Incomplete => {}
                }
            }
            if !self.fill().await? {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(Stop::NotARequest(
                        "a request head cut by the client's close",
                    ))
                };
            }
        }
    }

    /// Forwards the next `length` bytes.
    async fn forward(&mut self, mut length: u64, out: &mut OwnedWriteHalf) -> Result<(), Stop> {
        while length > 0 {
            if self.buffer.is_empty() && !self.fill().await? {
                return Err(Stop::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            let part = length.min(self.buffer.len() as u64) as usize;
            out.write_all(&self.buffer[..part]).await?;
            self.buffer.drain(..part);
            length -= part as u64;
        }
        Ok(())
    }

    /// The next line, with its CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, Stop> {
        loop {
            if let Some(end) = find(&self.buffer, b"\r\n") {
                return Ok(self.buffer.drain(..end + 2).collect());
            }
            if self.buffer.len() > MAX_LINE {
                return Err(Stop::NotARequest("a chunked body's line longer than 8 KiB"));
            }
            if !self.fill().await? {
                return Err(Stop::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Forwards a chunked body: its chunks, the last chunk, its trailers and the empty line.
    async fn forward_chunked(&mut self, out: &mut OwnedWriteHalf) -> Result<(), Stop> {
        loop {
            let line = self.line().await?;
            let Ok(httparse::Status::Complete((_, size))) = httparse::parse_chunk_size(&line)
            else {
                return Err(Stop::NotARequest("a malformed chunk size"));
            };
            out.write_all(&line).await?;
            if size == 0 {
                loop {
                    let trailer = self.line().await?;
                    out.write_all(&trailer).await?;
                    if trailer == b"\r\n" {
                        return Ok(());
                    }
                }
            }
            self.forward(size, out).await?;
            let end = self.line().await?;
            if end != b"\r\n" {
                return Err(Stop::NotARequest("a chunk not followed by CRLF"));
            }
            out.write_all(&end).await?;
        }
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// `Content-Length` bytes (0 without one).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// An `Upgrade` or CONNECT: what follows is up to the new version's answer.
    Tunnel,
}

/// What the bytes at the start of a held connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// A whole HTTP/1.x request head of `length` bytes.
    Request { length: usize, body: Body },
    /// They may begin an HTTP/1.x request head: more must come.
    Incomplete,
    /// They cannot begin one (why).
    NotARequest(&'static str),
}

/// Whether `bytes` begin with a whole HTTP/1.0 or HTTP/1.1 request head: a request line
/// `METHOD SP target SP HTTP/1.x CRLF` (the method in uppercase letters), header fields and an
/// empty line, within 64 KiB.
fn classify(bytes: &[u8]) -> Head {
    if let Err(why) = request_line(bytes) {
        return Head::NotARequest(why);
    }
    let Some(end) = find(bytes, b"\r\n\r\n").filter(|end| end + 4 <= MAX_HEAD) else {
        return if bytes.len() >= MAX_HEAD {
            Head::NotARequest("a request head longer than 64 KiB")
        } else {
            Head::Incomplete
        };
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&bytes[..end + 4]) {
        Ok(httparse::Status::Complete(length)) => match framing(&request) {
            Ok(body) => Head::Request { length, body },
            Err(why) => Head::NotARequest(why),
        },
        Ok(httparse::Status::Partial) | Err(_) => Head::NotARequest("a malformed request head"),
    }
}

/// Checks what there is of the first line; Ok while it may still become a request line.
fn request_line(bytes: &[u8]) -> Result<(), &'static str> {
    const NOT: &str = "bytes that do not begin an HTTP/1.x request (the rest of a body, or \
                       another protocol)";
    match bytes.first().copied() {
        None => return Ok(()),
        // Handshake, alert, change-cipher-spec or application data.
        Some(0x14..=0x17) => return Err("a TLS record"),
        Some(_) => {}
    }
    if bytes.starts_with(b"PRI * HTTP/2") || (b"PRI * HTTP/2".starts_with(bytes) && bytes.len() > 4)
    {
        return Err("the HTTP/2 connection preface");
    }
    let end = find(bytes, b"\r\n");
    let line = &bytes[..end.unwrap_or(bytes.len())];
    let whole = end.is_some();
    let method = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method == 0 && !line.is_empty() || method > MAX_METHOD {
        return Err(NOT);
    }
    let Some(rest) = line.get(method..).filter(|rest| !rest.is_empty()) else {
        return if whole { Err(NOT) } else { Ok(()) };
    };
    if rest[0] != b' ' {
        return Err(NOT);
    }
    let rest = &rest[1..];
    let target = rest
        .iter()
        .take_while(|b| (0x21..=0x7e).contains(*b))
        .count();
    if target == rest.len() {
        return if whole { Err(NOT) } else { Ok(()) };
    }
    if target == 0 || rest[target] != b' ' {
        return Err(NOT);
    }
    let version = &rest[target + 1..];
    const PREFIX: &[u8] = b"HTTP/1.";
    let shared = version.len().min(PREFIX.len());
    if version[..shared] != PREFIX[..shared] {
        return Err(NOT);
    }
    match &version[shared..] {
        [] if !whole => Ok(()),
        [b'0' | b'1'] => Ok(()),
        _ => Err(NOT),
    }
}

/// How a parsed request's body is framed (RFC 9112 §6), or why it is not relayed: framing
/// the agent and the new version might read differently is never forwarded.
fn framing(request: &httparse::Request) -> Result<Body, &'static str> {
    let mut length = None;
    let mut chunked = None;
    let mut upgrade = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| "a header value that is not text")?
            .trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("an invalid Content-Length");
            }
            let value: u64 = value.parse().map_err(|_| "an invalid Content-Length")?;
            if length.is_some_and(|length| length != value) {
                return Err("two different Content-Length values");
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only when it is the last coding applied.
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    match (chunked, length) {
        (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length"),
        (Some(false), None) => Err("a Transfer-Encoding that does not end with chunked"),
        _ if upgrade || request.method == Some("CONNECT") => Ok(Body::Tunnel),
        (Some(true), None) => Ok(Body::Chunked),
        (None, length) => Ok(Body::Length(length.unwrap_or(0))),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Shuts a connection down and lets it go: the client sees a FIN (or, if it sent bytes
/// nobody read, a RST) and retries, never another request's answer.
fn close(socket: &impl AsRawFd, local: SocketAddr, why: &str) {
    // SAFETY: shutdown(2) on a descriptor owned by the caller.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
    info!(
        %local,
        why,
        "closed a kept-alive connection of the old version instead of relaying it"
    );
}

/// Where the old version's reading of a connection stands.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// Bytes read from it so far (received less still unread).
    consumed: u64,
    /// Between requests: nothing unread, the last data sent after the last received, and
    /// all of it delivered. A request under way has bytes received after the last sent (the
    /// head, or body after a `100 Continue`).
    between_requests: bool,
    /// Bytes sent and acknowledged so far.
    acked: u64,
    /// Everything written to it was sent and acknowledged.
    delivered: bool,
}

/// The kernel's view of a connection's reading (TCP_INFO and SIOCINQ); `None` if unreadable.
fn reading(socket: &OwnedFd) -> Option<Reading> {
    // Bytes may arrive between the two calls: read until TCP_INFO's count is the same around
    // the SIOCINQ.
    for _ in 0..8 {
        let before = tcp_info(socket)?;
        let unread = unread(socket)?;
        let after = tcp_info(socket)?;
        if before.bytes_received != after.bytes_received {
            continue;
        }
        let delivered = after.unacked == 0 && after.notsent_bytes == 0;
        return Some(Reading {
            consumed: after.bytes_received.saturating_sub(unread),
            between_requests: unread == 0
                && delivered
                && after.last_data_sent_ms <= after.last_data_recv_ms,
            acked: after.bytes_acked,
            delivered,
        });
    }
    None
}

/// The fields of `struct tcp_info` (linux/tcp.h) the relay uses.
struct TcpInfo {
    unacked: u32,
    last_data_sent_ms: u32,
    last_data_recv_ms: u32,
    bytes_acked: u64,
    bytes_received: u64,
    notsent_bytes: u32,
}

fn tcp_info(socket: &OwnedFd) -> Option<TcpInfo> {
    // Offsets in `struct tcp_info`; `tcpi_notsent_bytes` (the last one used) is in kernels
    // since 4.6, far below the agent's minimum.
    const UNACKED: usize = 24;
    const LAST_DATA_SENT: usize = 44;
    const LAST_DATA_RECV: usize = 52;
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    const NOTSENT_BYTES: usize = 144;
    let mut buffer = [0u8; 256];
    let mut length = buffer.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes into `buffer` and updates `length`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buffer.as_mut_ptr().cast(),
            &mut length,
        )
    };
    if result != 0 || (length as usize) < NOTSENT_BYTES + 4 {
        return None;
    }
    let u32_at = |at: usize| u32::from_ne_bytes(buffer[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_ne_bytes(buffer[at..at + 8].try_into().unwrap());
    Some(TcpInfo {
        unacked: u32_at(UNACKED),
        last_data_sent_ms: u32_at(LAST_DATA_SENT),
        last_data_recv_ms: u32_at(LAST_DATA_RECV),
        bytes_acked: u64_at(BYTES_ACKED),
        bytes_received: u64_at(BYTES_RECEIVED),
        notsent_bytes: u32_at(NOTSENT_BYTES),
    })
}

/// Bytes received and not read yet (SIOCINQ).
fn unread(socket: &OwnedFd) -> Option<u64> {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut unread) };
    (result == 0).then_some(unread.max(0) as u64)
}

/// What waits unread on a connection now (up to a request head's bound), without taking it.
fn peek_now(socket: &OwnedFd) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; MAX_HEAD];
    // SAFETY: recv(2) writes at most `buffer.len()` bytes into it.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n <= 0 {
        return None;
    }
    buffer.truncate(n as usize);
    Some(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_1_1_request_between_requests_is_carried_with_its_body_framing() {
        let get = b"GET /mix HTTP/1.1\r\nHost: api\r\n\r\n";
        assert_eq!(
            classify(get),
            Head::Request {
                length: get.len(),
                body: Body::Length(0)
            }
        );
        let post = b"POST /upload HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            classify(post),
            Head::Request {
                length: post.len() - 5,
                body: Body::Length(5)
            }
        );
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\n";
        assert!(matches!(
            classify(chunked),
            Head::Request {
                body: Body::Chunked,
                ..
            }
        ));
    }

    #[test]
    fn a_tls_application_data_record_is_not_carried() {
        assert_eq!(
            classify(&[0x17, 0x03, 0x03, 0x00, 0x20, 0xab]),
            Head::NotARequest("a TLS record")
        );
        assert_eq!(classify(&[0x15]), Head::NotARequest("a TLS record"));
    }

    #[test]
    fn the_http_2_preface_and_http_2_frames_are_not_carried() {
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Head::NotARequest("the HTTP/2 connection preface")
        );
        assert_eq!(
            classify(b"PRI * HT"),
            Head::NotARequest("the HTTP/2 connection preface")
        );
        // A HEADERS frame on an established HTTP/2 connection: length, type 1, flags.
        assert!(matches!(
            classify(&[0x00, 0x00, 0x1d, 0x01, 0x05, 0x00, 0x00, 0x00, 0x03]),
            Head::NotARequest(_)
        ));
    }

    #[test]
    fn a_body_fragment_is_not_carried() {
        assert!(matches!(classify(&[b'x'; 4096]), Head::NotARequest(_)));
        assert!(matches!(
            classify(b"xxxxxxxx\r\n\r\n"),
            Head::NotARequest(_)
        ));
        assert!(matches!(classify(b"{\"id\": 1}"), Head::NotARequest(_)));
        // Looks like a method at first, then is not a request line.
        assert!(matches!(classify(b"ABC,DEF"), Head::NotARequest(_)));
        assert!(matches!(
            classify(b"GET / HTTP/2.0\r\n\r\n"),
            Head::NotARequest(_)
        ));
        // Uppercase letters that never become a request line.
        assert!(matches!(classify(&[b'X'; 64]), Head::NotARequest(_)));
    }

    #[test]
    fn an_incomplete_head_is_not_carried_until_it_is_whole() {
        for partial in [
            &b"G"[..],
            b"GET",
            b"GET ",
            b"GET /x",
            b"GET /x HTTP/1",
            b"GET /x HTTP/1.1",
            b"GET /x HTTP/1.1\r\n",
            b"GET /x HTTP/1.1\r\nHost: api\r\n",
        ] {
            assert_eq!(classify(partial), Head::Incomplete, "{partial:?}");
        }
        let mut endless = b"GET / HTTP/1.1\r\n".to_vec();
        while endless.len() < MAX_HEAD {
            endless.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(classify(&endless), Head::NotARequest(_)));
    }

    #[test]
    fn framing_that_two_readers_could_read_differently_is_not_carried() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(matches!(classify(head), Head::NotARequest(_)), "{head:?}");
        }
        assert!(matches!(
            classify(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            Head::Request {
                body: Body::Tunnel,
                ..
            }
        ));
    }
}
