//! HAProxy agent-check responder: answers each connection with the backend's state word
//! (`ready up 100%`, `drain`, `maint`) and closes. It never accepts commands.
//!
//! HAProxy sends nothing unless the server line has `agent-send`; with `agent-send
//! "nova-api\n"` the first line names the backend. With a single backend configured, a silent
//! connection gets that backend's state.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

/// How long to wait for an `agent-send` line before answering for the only backend.
const SEND_WAIT: Duration = Duration::from_millis(200);
/// Longest name line read.
const MAX_LINE: u64 = 256;

/// Looks up the answer for a backend name (`None`: the only backend).
pub trait Answer: Send + Sync + 'static {
    /// The state word for the named backend, or for the only one; `None` if unknown.
    fn answer(&self, backend: Option<&str>) -> Option<String>;
}

/// Serves agent checks until the task is dropped.
pub async fn serve(listener: TcpListener, answers: Arc<dyn Answer>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let answers = answers.clone();
                tokio::spawn(async move {
                    if let Err(err) = respond(stream, answers.as_ref()).await {
                        debug!(%peer, %err, "agent check connection failed");
                    }
                });
            }
            Err(err) => {
                warn!(%err, "agent check accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(stream: TcpStream, answers: &dyn Answer) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE);
    let mut line = String::new();
    let named = match tokio::time::timeout(SEND_WAIT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Some(line.trim().to_string()),
        // Silent (no agent-send), closed, or not text: answer for the only backend.
        _ => None,
    };
    let answer = match answers.answer(named.as_deref().filter(|name| !name.is_empty())) {
        Some(answer) => answer,
        None => {
            warn!(
                request = named.as_deref().unwrap_or(""),
                "agent check for an unknown backend: set `agent-send \"<backend>\\n\"` on the \
                 HAProxy server line"
            );
            // A comment-only line: HAProxy changes nothing.
            "#unknown backend".to_string()
        }
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::{tests_support::Fixed, *};

    async fn ask(address: std::net::SocketAddr, send: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(send).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn answers_named_silent_and_unknown_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed)));
        assert_eq!(ask(address, b"nova-api\n").await, "drain\n");
        assert_eq!(ask(address, b"").await, "drain\n");
        assert_eq!(
            ask(address, b"set server x state ready\n").await,
            "#unknown backend\n"
        );
        assert_eq!(ask(address, &[0xff; 300]).await, "drain\n");
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
                let server = tokio::spawn(serve(listener, Arc::new(Fixed)));
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
    use super::Answer;

    /// One backend, "nova-api", draining.
    pub struct Fixed;

    impl Answer for Fixed {
        fn answer(&self, backend: Option<&str>) -> Option<String> {
            match backend {
                None | Some("nova-api") => Some("drain".into()),
                Some(_) => None,
            }
        }
    }
}
