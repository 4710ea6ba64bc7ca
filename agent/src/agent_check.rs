//! HAProxy agent-check responder: answers each connection with the backend's state word and
//! closes. It never accepts commands. The words (docs/operations.md#what-agent-check-says):
//! `drain` or `maint` while the agent holds the server out, `ready up` to each load balancer
//! until it has been told twice after the agent put the server back, and `up` otherwise — no
//! admin word, so an operator's MAINT or DRAIN stands (HAProxy applies agent answers and
//! runtime API commands to the same admin flags: the last writer wins).
//!
//! HAProxy sends nothing unless the server line has `agent-send`; with `agent-send
//! "nova-api\n"` the first line names the backend. With a single backend configured, a silent
//! connection gets that backend's state.
//!
//! Every answer is recorded per peer ([`Pollers`]): a load balancer that learns the server's
//! state only through agent-check has "confirmed" a drain or a return once it was answered the
//! new word, and the drain and cycle wait for exactly that.
//!
//! The port is open to the network, so what a peer can make the agent hold is bounded: a
//! connection lives at most [`CONNECTION_DEADLINE`], each source address holds at most
//! [`PER_SOURCE_CONNECTIONS`] at once, all of them at most `agent_check_max_connections`, and
//! an optional allow list closes the door on everyone else. Warnings about refused peers are
//! rate-limited so a flood cannot fill the journal.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

/// How long to wait for an `agent-send` line before answering for the only backend.
const SEND_WAIT: Duration = Duration::from_millis(200);
/// The longest a connection may live, whatever the peer does.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(1);
/// Connections one source address may hold at once: HAProxy opens one per server per check.
pub const PER_SOURCE_CONNECTIONS: usize = 32;
/// Longest name line read.
const MAX_LINE: u64 = 256;
/// At most one warning of a kind per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Looks up the answer for a backend name (`None`: the only backend).
pub trait Answer: Send + Sync + 'static {
    /// The backend's index and its state word for `peer`, for the named backend or the only
    /// one; `None` if unknown.
    fn answer(&self, backend: Option<&str>, peer: IpAddr) -> Option<(usize, String)>;
}

/// Who may connect and how many at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sources allowed to connect; empty: everyone.
    pub allow: Vec<IpNet>,
    /// Connections served at once, from all sources together.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            allow: Vec::new(),
            max_connections: 256,
        }
    }
}

/// What one peer was last told about one backend, and when.
#[derive(Debug, Clone)]
pub struct Answered {
    pub word: String,
    pub at: Instant,
    /// How many answers in a row carried this word, and when the first of them was sent.
    pub streak: u32,
    pub streak_since: Instant,
    /// When the last two `ready` answers since the last `drain` or `maint` were sent (older,
    /// newer); `up` answers in between leave them. Two of them after the agent put the server
    /// back confirm the return (HAProxy marks a server UP after `rise` checks, so the second
    /// `ready` is the evidence), and the agent owes that peer no more `ready`.
    pub readies: (Option<Instant>, Option<Instant>),
}

impl Answered {
    /// When the second `ready` at or after `since` was sent: the return is confirmed then.
    pub fn ready_confirmed_since(&self, since: Instant) -> Option<Instant> {
        match self.readies {
            (Some(older), Some(newer)) if older >= since => Some(newer),
            _ => None,
        }
    }
}

/// Every peer that polled, per backend: the evidence that an agent-check-only load balancer
/// has seen a state change.
#[derive(Debug, Default)]
pub struct Pollers {
    answers: Mutex<HashMap<(IpAddr, usize), Answered>>,
}

impl Pollers {
    /// Records that `peer` was answered `word` for backend `backend` just now.
    pub fn record(&self, peer: IpAddr, backend: usize, word: &str) {
        let now = Instant::now();
        let mut answers = self.answers.lock().expect("pollers lock");
        let last = answers.get(&(peer, backend));
        let (streak, streak_since) = match last {
            Some(last) if last.word == word => (last.streak + 1, last.streak_since),
            _ => (1, now),
        };
        let readies = last.map_or((None, None), |last| last.readies);
        let readies = match word.split_whitespace().next() {
            Some("ready") => (readies.1, Some(now)),
            Some("drain" | "maint") => (None, None),
            _ => readies,
        };
        answers.insert(
            (peer, backend),
            Answered {
                word: word.to_string(),
                at: now,
                streak,
                streak_since,
                readies,
            },
        );
    }

    /// Whether `peer` still has to be told `ready` about `backend` after the agent put it
    /// back at `returned`: until it was answered `ready` twice since then.
    pub fn owes_ready(&self, peer: IpAddr, backend: usize, returned: Instant) -> bool {
        self.last(peer, backend)
            .and_then(|answered| answered.ready_confirmed_since(returned))
            .is_none()
    }

    /// Peers that polled `backend` at or after `since`.
    pub fn polled_since(&self, backend: usize, since: Instant) -> Vec<IpAddr> {
        let answers = self.answers.lock().expect("pollers lock");
        let mut peers: Vec<IpAddr> = answers
            .iter()
            .filter(|((_, index), answered)| *index == backend && answered.at >= since)
            .map(|((peer, _), _)| *peer)
            .collect();
        peers.sort();
        peers
    }

    /// When `peer` was last answered for `backend`, and with what.
    pub fn last(&self, peer: IpAddr, backend: usize) -> Option<Answered> {
        self.answers
            .lock()
            .expect("pollers lock")
            .get(&(peer, backend))
            .cloned()
    }
}

/// Counts suppressed warnings of one kind and lets one through per [`WARN_EVERY`].
struct RateLimited {
    last: Mutex<Option<Instant>>,
    suppressed: Mutex<u64>,
}

impl RateLimited {
    const fn new() -> RateLimited {
        RateLimited {
            last: Mutex::new(None),
            suppressed: Mutex::new(0),
        }
    }

    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("warn lock");
        let mut suppressed = self.suppressed.lock().expect("warn lock");
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(&mut *suppressed))
    }
}

/// The responder's shared state.
struct Responder {
    answers: Arc<dyn Answer>,
    pollers: Arc<Pollers>,
    limits: Limits,
    all: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    refused_warning: RateLimited,
    unknown_warning: RateLimited,
}

/// Releases a source's connection slot when its connection ends.
struct SourceSlot<'a> {
    responder: &'a Responder,
    peer: IpAddr,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut per_source = self.responder.per_source.lock().expect("source lock");
        if let Some(count) = per_source.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_source.remove(&self.peer);
            }
        }
    }
}

impl Responder {
    fn allowed(&self, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        self.limits.allow.is_empty() || self.limits.allow.iter().any(|net| net.contains(&peer))
    }

    fn take_source_slot(&self, peer: IpAddr) -> Option<SourceSlot<'_>> {
        let mut per_source = self.per_source.lock().expect("source lock");
        let count = per_source.entry(peer).or_insert(0);
        if *count >= PER_SOURCE_CONNECTIONS {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            responder: self,
            peer,
        })
    }

    fn refuse(&self, peer: SocketAddr, why: &str) {
        if let Some(suppressed) = self.refused_warning.allow() {
            warn!(
                %peer,
                suppressed,
                "agent check connection refused: {why}"
            );
        }
    }
}

/// IPv4-mapped IPv6 peers (a dual-stack listener) as plain IPv4, so allow lists and the
/// poller records name them the way an operator writes them.
fn canonical(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Serves agent checks until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    answers: Arc<dyn Answer>,
    pollers: Arc<Pollers>,
    limits: Limits,
) {
    let responder = Arc::new(Responder {
        answers,
        pollers,
        all: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        per_source: Mutex::new(HashMap::new()),
        refused_warning: RateLimited::new(),
        unknown_warning: RateLimited::new(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "agent check accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = canonical(peer.ip());
        if !responder.allowed(source) {
            responder.refuse(peer, "not in agent_check_allow");
            continue; // dropping the stream closes it
        }
        let Ok(permit) = responder.all.clone().try_acquire_owned() else {
            responder.refuse(peer, "agent_check_max_connections reached");
            continue;
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(_slot) = responder.take_source_slot(source) else {
                responder.refuse(peer, "too many connections from this address");
                return;
            };
            match tokio::time::timeout(CONNECTION_DEADLINE, respond(stream, source, &responder))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(err)) => debug!(%peer, %err, "agent check connection failed"),
                Err(_) => debug!(%peer, "agent check connection timed out"),
            }
        });
    }
}

async fn respond(stream: TcpStream, peer: IpAddr, responder: &Responder) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE);
    let mut line = String::new();
    let named = match tokio::time::timeout(SEND_WAIT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Some(line.trim().to_string()),
        // Silent (no agent-send), closed, or not text: answer for the only backend.
        _ => None,
    };
    let asked = named.as_deref().filter(|name| !name.is_empty());
    let (backend, answer) = match responder.answers.answer(asked, peer) {
        Some((backend, answer)) => (Some(backend), answer),
        None => {
            if let Some(suppressed) = responder.unknown_warning.allow() {
                warn!(
                    %peer,
                    request = named.as_deref().unwrap_or(""),
                    suppressed,
                    "agent check for an unknown backend: set `agent-send \"<backend>\\n\"` on the \
                     HAProxy server line"
                );
            }
            // A comment-only line: HAProxy changes nothing.
            (None, "#unknown backend".to_string())
        }
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    if let Some(backend) = backend {
        responder.pollers.record(peer, backend, &answer);
    }
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::{tests_support::Fixed, *};

    /// Sends `send` and reads the answer; a connection the responder closed at once reads
    /// as an empty answer.
    async fn ask(address: std::net::SocketAddr, send: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let _ = stream.write_all(send).await;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    }

    async fn responder(limits: Limits) -> (SocketAddr, Arc<Pollers>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let pollers = Arc::new(Pollers::default());
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), pollers.clone(), limits));
        (address, pollers, server)
    }

    #[tokio::test]
    async fn answers_named_silent_and_unknown_requests_and_records_who_was_told() {
        let (address, pollers, server) = responder(Limits::default()).await;
        let before = Instant::now();
        assert_eq!(ask(address, b"nova-api\n").await, "drain\n");
        assert_eq!(ask(address, b"").await, "drain\n");
        assert_eq!(
            ask(address, b"set server x state ready\n").await,
            "#unknown backend\n"
        );
        assert_eq!(ask(address, &[0xff; 300]).await, "drain\n");
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(pollers.polled_since(0, before), vec![localhost]);
        assert_eq!(pollers.last(localhost, 0).unwrap().word, "drain");
        server.abort();
    }

    #[test]
    fn a_return_is_owed_to_each_peer_until_it_was_told_ready_twice_and_up_does_not_undo_it() {
        let pollers = Pollers::default();
        let lb1: IpAddr = "192.0.2.11".parse().unwrap();
        let lb2: IpAddr = "192.0.2.12".parse().unwrap();
        pollers.record(lb1, 0, "maint");
        let returned = Instant::now();
        assert!(pollers.owes_ready(lb1, 0, returned));
        assert!(
            pollers.owes_ready(lb2, 0, returned),
            "a peer never told is owed too"
        );
        pollers.record(lb1, 0, "ready up");
        assert!(
            pollers.owes_ready(lb1, 0, returned),
            "one ready is not a return yet"
        );
        pollers.record(lb1, 0, "ready up");
        assert!(!pollers.owes_ready(lb1, 0, returned));
        let confirmed = pollers
            .last(lb1, 0)
            .unwrap()
            .ready_confirmed_since(returned);
        pollers.record(lb1, 0, "up");
        assert!(
            !pollers.owes_ready(lb1, 0, returned),
            "up keeps the confirmation"
        );
        assert_eq!(
            pollers
                .last(lb1, 0)
                .unwrap()
                .ready_confirmed_since(returned),
            confirmed
        );
        // The next drain clears it; the next return is owed again.
        pollers.record(lb1, 0, "drain");
        assert!(pollers.owes_ready(lb1, 0, returned));
        // Readies from before a return do not count for it.
        pollers.record(lb2, 0, "ready up");
        pollers.record(lb2, 0, "ready up");
        std::thread::sleep(Duration::from_millis(1));
        assert!(pollers.owes_ready(lb2, 0, Instant::now()));
    }

    #[tokio::test]
    async fn a_source_outside_the_allow_list_is_closed_without_an_answer() {
        let (address, pollers, server) = responder(Limits {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..Limits::default()
        })
        .await;
        let before = Instant::now();
        assert_eq!(ask(address, b"nova-api\n").await, "");
        assert!(pollers.polled_since(0, before).is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn idle_connections_are_closed_at_the_deadline_and_cannot_starve_others() {
        let (address, _, server) = responder(Limits {
            max_connections: 8,
            ..Limits::default()
        })
        .await;
        // Eight idle peers that never read: they hold every slot for at most the deadline.
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        tokio::time::sleep(CONNECTION_DEADLINE + SEND_WAIT).await;
        assert_eq!(ask(address, b"nova-api\n").await, "drain\n");
        server.abort();
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::{tests_support::Fixed, *};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever a peer sends, the answer is one state word line (or the comment for an
        /// unknown backend): never anything a command could produce.
        #[test]
        fn any_bytes_get_a_state_word(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let answer = runtime.block_on(async {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap();
                let server = tokio::spawn(serve(
                    listener,
                    Arc::new(Fixed),
                    Arc::new(Pollers::default()),
                    Limits::default(),
                ));
                let mut stream = TcpStream::connect(address).await.unwrap();
                let _ = stream.write_all(&bytes).await;
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer).await;
                server.abort();
                answer
            });
            prop_assert!(answer == "drain\n" || answer == "#unknown backend\n", "{:?}", answer);
        }
    }
}

#[cfg(test)]
mod tests_support {
    use std::net::IpAddr;

    use super::Answer;

    /// One backend, "nova-api", draining.
    pub struct Fixed;

    impl Answer for Fixed {
        fn answer(&self, backend: Option<&str>, _peer: IpAddr) -> Option<(usize, String)> {
            match backend {
                None | Some("nova-api") => Some((0, "drain".into())),
                Some(_) => None,
            }
        }
    }
}
