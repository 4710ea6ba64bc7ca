//! The control socket: a Unix stream socket carrying one JSON request line and one JSON
//! response line per connection. The CLI is its client.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{debug, warn};

use tokio::sync::mpsc;

use crate::{
    drain::{Progress, Report},
    status::Status,
};

/// Longest request line accepted; anything longer is refused, not buffered.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The agent's status.
    Status,
    /// Drain a backend; with `wait`, answer only when it is drained.
    Drain { backend: String, wait: bool },
    /// Put a backend back in service (cancelling its drain).
    Resume { backend: String },
    /// Drain, restart, verify and put back.
    Cycle { backend: String },
    /// Start the next version beside the running one and hand new connections to it.
    Handover { backend: String },
    /// Follow the backend's running drain or cycle to its end (or get its last report).
    Wait { backend: String },
}

/// What the agent answers: one line, or for drains and cycles a stream of progress lines
/// ending with a report (or a refusal).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Status(Status),
    /// The load balancers confirmed the drain (`unconfirmed` names those that did not within
    /// their bound); it goes on in the agent.
    Started {
        backend: String,
        #[serde(default)]
        unconfirmed: Vec<String>,
    },
    Progress(Progress),
    Report(Box<Report>),
    /// The operation did not start; nothing was changed.
    Refused {
        exit_code: u8,
        message: String,
    },
    Error {
        message: String,
    },
}

/// Problems talking to (or serving) the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the agent at {path}: {reason}. Is `drain-agent run` running, and is \
         this the control_socket from its config?"
    )]
    Connect {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("talking to the agent at {path} failed: {reason}")]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("the agent at {path} sent an answer that is not understood: {reason}")]
    Protocol {
        path: PathBuf,
        reason: serde_json::Error,
    },
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error(
        "another drain-agent already serves the control socket {0}: stop it first, or give \
         this one a different control_socket"
    )]
    InUse(PathBuf),
    #[error("cannot create the control socket {path}: {reason}")]
    Bind {
        path: PathBuf,
        reason: std::io::Error,
    },
}

/// Sends one request and waits for the answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    request_streaming(path, request, |_| {})
}

/// Sends one request; every answer line but the last goes to `on_progress`, the last is
/// returned. Waits as long as the operation runs.
pub fn request_streaming(
    path: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&Response),
) -> Result<Response, ControlError> {
    let io = |reason| ControlError::Io {
        path: path.to_owned(),
        reason,
    };
    let mut stream = UnixStream::connect(path).map_err(|reason| ControlError::Connect {
        path: path.to_owned(),
        reason,
    })?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut last: Option<Response> = None;
    loop {
        let mut answer = String::new();
        if reader.read_line(&mut answer).map_err(io)? == 0 {
            break;
        }
        let response: Response =
            serde_json::from_str(&answer).map_err(|reason| ControlError::Protocol {
                path: path.to_owned(),
                reason,
            })?;
        if let Some(previous) = last.replace(response) {
            on_progress(&previous);
        }
    }
    match last {
        None => Err(ControlError::Io {
            path: path.to_owned(),
            reason: std::io::ErrorKind::UnexpectedEof.into(),
        }),
        Some(Response::Error { message }) => Err(ControlError::Refused(message)),
        Some(other) => Ok(other),
    }
}

/// Who is on the other end of a control connection (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Request {
    /// Whether the request changes anything (only trusted peers may send those).
    pub fn changes_state(&self) -> bool {
        !matches!(self, Request::Status | Request::Wait { .. })
    }
}

/// Binds the control socket: creates its directory, replaces a stale socket file left by a
/// dead agent, refuses to steal one a live agent still serves, and allows only the owner —
/// or, with `group`, that group too (mode 0660).
pub fn bind(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, ControlError> {
    let bind_error = |reason| ControlError::Bind {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_error)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves connections until the task is dropped. `answer` starts answering a request and
/// returns the channel its answer lines arrive on; the connection closes when it closes.
pub async fn serve<F>(listener: tokio::net::UnixListener, answer: F)
where
    F: Fn(Request, Peer) -> mpsc::Receiver<Response> + Clone + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(connection) => connection,
            Err(err) => {
                warn!(%err, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, answer).await {
                debug!(%err, "control connection ended with an error");
            }
        });
    }
}

async fn handle<F>(stream: tokio::net::UnixStream, answer: F) -> std::io::Result<()>
where
    F: Fn(Request, Peer) -> mpsc::Receiver<Response>,
{
    let credentials = stream.peer_cred()?;
    let peer = Peer {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: credentials.pid(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES);
    let mut line = String::new();
    let error = |message: String| Response::Error { message };
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err(error("no request within 5s".into())),
        Ok(Err(err)) => Err(error(format!("unreadable request: {err}"))),
        Ok(Ok(_)) if !line.ends_with('\n') => Err(error(format!(
            "request must be one JSON line of at most {MAX_REQUEST_BYTES} bytes"
        ))),
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line).map_err(|err| {
            error(format!(
                "malformed request ({err}); expected e.g. {{\"command\":\"status\"}}"
            ))
        }),
    };
    let mut answers = match request {
        Ok(request) => answer(request, peer),
        Err(response) => {
            let (sender, receiver) = mpsc::channel(1);
            let _ = sender.try_send(response);
            receiver
        }
    };
    while let Some(response) = answers.recv().await {
        let mut out = serde_json::to_vec(&response).expect("responses serialize");
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Drain {
                backend: "nova-api".into(),
                wait: true
            })
            .unwrap(),
            r#"{"command":"drain","backend":"nova-api","wait":true}"#
        );
    }

    #[tokio::test]
    async fn garbage_gets_an_error_and_status_an_answer() {
        let dir = std::env::temp_dir().join(format!("drain-agent-control-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path, None).unwrap();
        let server = tokio::spawn(serve(listener, |request, _peer| {
            let (sender, receiver) = mpsc::channel(1);
            let _ = sender.try_send(Response::Error {
                message: format!("seen {request:?}"),
            });
            receiver
        }));
        let client_path = path.clone();
        let (garbage, status) = tokio::task::spawn_blocking(move || {
            let mut stream = UnixStream::connect(&client_path).unwrap();
            stream.write_all(b"not json\n").unwrap();
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer).unwrap();
            (answer, request(&client_path, &Request::Status))
        })
        .await
        .unwrap();
        assert!(garbage.contains("malformed request"), "{garbage}");
        assert!(matches!(status, Err(ControlError::Refused(m)) if m == "seen Status"));
        assert!(matches!(bind(&path, None), Err(ControlError::InUse(_))));
        server.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any bytes get exactly one JSON answer line, and the server keeps serving.
        #[test]
        fn any_bytes_get_one_answer_line(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = std::env::temp_dir().join(format!("drain-agent-fuzz-{}", std::process::id()));
            let path = dir.join("control.sock");
            let _ = std::fs::remove_file(&path);
            let answer = runtime.block_on(async {
                let listener = bind(&path, None).unwrap();
                let server = tokio::spawn(serve(listener, |request, _peer| {
                    let (sender, receiver) = mpsc::channel(1);
                    let _ = sender.try_send(Response::Error { message: format!("{request:?}") });
                    receiver
                }));
                let client_path = path.clone();
                let answer = tokio::task::spawn_blocking(move || {
                    let mut stream = UnixStream::connect(&client_path).unwrap();
                    let _ = stream.write_all(&bytes);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    let mut answer = String::new();
                    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
                    // Still serving afterwards.
                    let status = request(&client_path, &Request::Status);
                    // The fake handler answers every request with an error line.
                    (answer, matches!(status, Err(ControlError::Refused(_))))
                })
                .await
                .unwrap();
                server.abort();
                answer
            });
            let (answer, status_answered) = answer;
            prop_assert!(status_answered, "the server stopped answering");
            prop_assert_eq!(answer.matches('\n').count(), 1, "{:?}", answer);
            prop_assert!(serde_json::from_str::<Response>(answer.trim_end()).is_ok(), "{:?}", answer);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
