//! Health checks for a restarted service: an HTTP or HTTPS GET expecting a status (reqwest on
//! rustls, trusting the system's roots and the check's `ca`), or a TCP connect.

use std::{
    error::Error as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use reqwest::{Certificate, Client, Url, redirect};
use tokio::net::TcpStream;

use crate::config::{HealthCheck, Probe};

/// Longest one probe may take (connecting, TLS and the answer's head together).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between probes.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// Passes in a row that make a service healthy: one lucky answer from a flapping service
/// must not put it back in rotation.
pub const HEALTHY_IN_A_ROW: u32 = 3;

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error("cannot resolve {address}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the CA file {}", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {} holds no usable PEM certificate", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("the request failed")]
    Request(#[source] reqwest::Error),
    #[error("status {0}")]
    Status(u16),
}

/// Probes until [`HEALTHY_IN_A_ROW`] pass in a row or the check's timeout runs out; the error
/// says what the last probe saw, and whether the service flapped.
pub async fn wait_healthy(check: &HealthCheck) -> Result<Duration, String> {
    wait_healthy_from(check, None).await
}

/// Like [`wait_healthy`], with every probe's connection made from `source` (a handover's
/// probes of the new version come from an address of their own, docs/handover.md).
pub async fn wait_healthy_from(
    check: &HealthCheck,
    source: Option<IpAddr>,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no probe ran");
    let mut in_a_row = 0;
    let mut passes = 0;
    let mut probes = 0;
    // Built once (it loads the system's roots), again only if building failed.
    let mut prober: Option<Prober> = None;
    while started.elapsed() < check.timeout {
        let attempt = async {
            if prober.is_none() {
                prober = Some(Prober::new(&check.probe, source).await?);
            }
            prober.as_ref().expect("just built").probe().await
        };
        probes += 1;
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(())) => {
                passes += 1;
                in_a_row += 1;
                if in_a_row >= HEALTHY_IN_A_ROW {
                    return Ok(started.elapsed());
                }
            }
            Ok(Err(err)) => {
                in_a_row = 0;
                last = with_causes(&err);
            }
            Err(_) => {
                in_a_row = 0;
                last = format!(
                    "no answer within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                )
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    let flapped = if passes > 0 {
        format!(
            "it flapped ({passes} of {probes} probes passed, never {HEALTHY_IN_A_ROW} in a row); "
        )
    } else {
        String::new()
    };
    Err(format!(
        "{} not healthy within {}: {flapped}{last}",
        describe(&check.probe),
        humantime::format_duration(check.timeout)
    ))
}

/// What a probe checks, for messages.
pub fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Http {
            url, host, expect, ..
        } => match host {
            Some(host) => format!("GET {url} as {host} (expecting {expect})"),
            None => format!("GET {url} (expecting {expect})"),
        },
        Probe::Tcp(address) => format!("TCP connect to {address}"),
    }
}

/// One probe, with a client of its own.
pub async fn probe(probe: &Probe) -> Result<(), ProbeError> {
    Prober::new(probe, None).await?.probe().await
}

/// A probe ready to run again and again.
enum Prober {
    Tcp(String, Option<IpAddr>),
    Http {
        client: Client,
        url: Url,
        expect: u16,
    },
}

impl Prober {
    async fn new(probe: &Probe, source: Option<IpAddr>) -> Result<Prober, ProbeError> {
        let (url, host, ca, expect) = match probe {
            Probe::Tcp(address) => return Ok(Prober::Tcp(address.clone(), source)),
            Probe::Http {
                url,
                host,
                ca,
                expect,
            } => (url, host, ca, *expect),
        };
        let mut url = url.clone();
        let mut builder = Client::builder()
            .user_agent(concat!("drain-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(PROBE_TIMEOUT)
            .timeout(PROBE_TIMEOUT)
            // The first answer is the one compared with `expect`; no proxy stands between
            // the agent and a service on its own node.
            .redirect(redirect::Policy::none())
            .no_proxy()
            // A fresh connection per probe: what proves the restarted service accepts.
            .pool_max_idle_per_host(0)
            .local_address(source);
        if let Some(path) = ca {
            // A few kilobytes, read once per check.
            let pem = std::fs::read(path).map_err(|source| ProbeError::ReadCa {
                path: path.clone(),
                source,
            })?;
            let certificates =
                Certificate::from_pem_bundle(&pem).map_err(|source| ProbeError::BadCa {
                    path: path.clone(),
                    source,
                })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some(host) = host {
            // Ask the URL's address, but by `host`: the Host header, SNI and the name the
            // certificate must carry.
            let address = connect_address(&url).await?;
            url.set_host(Some(host))
                .expect("config checked that `host` is a host name");
            builder = builder.resolve(host, address);
        }
        let client = builder.build().map_err(ProbeError::Client)?;
        Ok(Prober::Http {
            client,
            url,
            expect,
        })
    }

    async fn probe(&self) -> Result<(), ProbeError> {
        match self {
            Prober::Tcp(address, None) => TcpStream::connect(address.as_str())
                .await
                .map(drop)
                .map_err(ProbeError::Connect),
            Prober::Tcp(address, Some(source)) => {
                let target = tokio::net::lookup_host(address.as_str())
                    .await
                    .map_err(ProbeError::Connect)?
                    .find(|target| target.is_ipv4() == source.is_ipv4())
                    .ok_or_else(|| {
                        ProbeError::Connect(std::io::Error::other(format!(
                            "{address} has no address of the probe source's family"
                        )))
                    })?;
                let socket = match source {
                    IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .map_err(ProbeError::Connect)?;
                socket
                    .bind(SocketAddr::new(*source, 0))
                    .map_err(ProbeError::Connect)?;
                socket
                    .connect(target)
                    .await
                    .map(drop)
                    .map_err(ProbeError::Connect)
            }
            Prober::Http {
                client,
                url,
                expect,
            } => {
                let response = client
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(ProbeError::Request)?;
                match response.status().as_u16() {
                    status if status == *expect => Ok(()),
                    status => Err(ProbeError::Status(status)),
                }
            }
        }
    }
}

/// Where the URL's host and port lead (the first address).
async fn connect_address(url: &Url) -> Result<SocketAddr, ProbeError> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let address = format!(
        "{}:{port}",
        host.trim_start_matches('[').trim_end_matches(']')
    );
    let resolve = |source| ProbeError::Resolve {
        address: address.clone(),
        source,
    };
    tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(resolve)?
        .next()
        .ok_or_else(|| resolve(std::io::ErrorKind::NotFound.into()))
}

/// The error and its causes on one line: reqwest's own message says little ("error sending
/// request"), the cause says what to fix ("invalid peer certificate: UnknownIssuer").
fn with_causes(err: &ProbeError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, sync::Arc};

    use http_body_util::Full;
    use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{
        TlsAcceptor,
        rustls::{
            ServerConfig,
            pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        },
    };

    use super::*;

    async fn server(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    fn http(url: &str, expect: u16) -> Probe {
        Probe::Http {
            url: url.parse().unwrap(),
            host: None,
            ca: None,
            expect,
        }
    }

    #[tokio::test]
    async fn http_probe_compares_the_status() {
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe(&http(&format!("http://{ok}/"), 200)).await.unwrap();
        assert_eq!(
            probe(&http(&format!("http://{ok}/"), 204))
                .await
                .unwrap_err()
                .to_string(),
            "status 200"
        );
        let broken = server("garbage\r\n").await;
        let err = probe(&http(&format!("http://{broken}/"), 200))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Request(_)), "{err:?}");
    }

    #[tokio::test]
    async fn http_probe_reads_a_chunked_answer() {
        let chunked =
            server("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                .await;
        probe(&http(&format!("http://{chunked}/"), 200))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn wait_healthy_gives_up_with_the_last_reason() {
        let check = HealthCheck {
            probe: Probe::Tcp("127.0.0.1:1".into()),
            timeout: Duration::from_millis(300),
        };
        let err = wait_healthy(&check).await.unwrap_err();
        assert!(
            err.starts_with("TCP connect to 127.0.0.1:1 not healthy within"),
            "{err}"
        );
        assert!(
            err.ends_with("cannot connect: Connection refused (os error 111)"),
            "{err}"
        );
    }

    /// A TLS server with a self-signed certificate for `names`, answering `status` and
    /// echoing the Host header it got; returns its port and the certificate as PEM.
    async fn tls_server(names: &[&str], status: u16) -> (u16, String) {
        let certified = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                key,
            )
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let host = request
                            .headers()
                            .get("host")
                            .and_then(|host| host.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let mut response = Response::new(Full::new(Bytes::from(host)));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (port, certified.cert.pem())
    }

    fn ca_file(pem: &str) -> (tempfile_dir::Dir, PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("ca.pem");
        std::fs::write(&path, pem).unwrap();
        (dir, path)
    }

    /// A directory removed when dropped (the agent has no tempfile dependency).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "drain-agent-health-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn https_probe_trusts_the_certificate_through_ca() {
        let (port, pem) = tls_server(&["localhost", "127.0.0.1"], 200).await;
        let (_dir, ca) = ca_file(&pem);
        let probe_with = |ca: Option<PathBuf>, expect| Probe::Http {
            url: format!("https://127.0.0.1:{port}/healthz").parse().unwrap(),
            host: None,
            ca,
            expect,
        };
        probe(&probe_with(Some(ca.clone()), 200)).await.unwrap();
        assert_eq!(
            probe(&probe_with(Some(ca), 204))
                .await
                .unwrap_err()
                .to_string(),
            "status 200"
        );
        // Without `ca` the system's roots do not know a self-signed certificate.
        let err = with_causes(&probe(&probe_with(None, 200)).await.unwrap_err());
        assert!(err.contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn https_probe_with_host_sends_it_and_checks_the_certificate_for_it() {
        let (port, pem) = tls_server(&["api.internal"], 200).await;
        let (_dir, ca) = ca_file(&pem);
        let probe_as = |host: Option<&str>| Probe::Http {
            url: format!("https://127.0.0.1:{port}/").parse().unwrap(),
            host: host.map(str::to_string),
            ca: Some(ca.clone()),
            expect: 200,
        };
        probe(&probe_as(Some("api.internal"))).await.unwrap();
        let Prober::Http { client, url, .. } = Prober::new(&probe_as(Some("api.internal")), None)
            .await
            .unwrap()
        else {
            panic!("an HTTP prober");
        };
        let echoed = client.get(url).send().await.unwrap().text().await.unwrap();
        assert_eq!(echoed, format!("api.internal:{port}"));
        // By address the certificate (for api.internal only) does not match.
        let err = with_causes(&probe(&probe_as(None)).await.unwrap_err());
        assert!(err.contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn an_unreadable_ca_file_is_named() {
        let probe = Probe::Http {
            url: "https://127.0.0.1:1/".parse().unwrap(),
            host: None,
            ca: Some("/nonexistent/ca.pem".into()),
            expect: 200,
        };
        let check = HealthCheck {
            probe,
            timeout: Duration::from_millis(100),
        };
        let err = wait_healthy(&check).await.unwrap_err();
        assert!(
            err.ends_with("cannot read the CA file /nonexistent/ca.pem: No such file or directory (os error 2)"),
            "{err}"
        );
    }
}
