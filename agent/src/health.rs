//! Health checks for a restarted service: an HTTP GET expecting a status, or a TCP connect.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{HealthCheck, Probe};

/// Longest one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between failed probes.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Probes until one passes or the check's timeout runs out; the error says what the last
/// probe saw.
pub async fn wait_healthy(check: &HealthCheck) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no probe ran");
    while started.elapsed() < check.timeout {
        match tokio::time::timeout(PROBE_TIMEOUT, probe(&check.probe)).await {
            Ok(Ok(())) => return Ok(started.elapsed()),
            Ok(Err(err)) => last = err,
            Err(_) => {
                last = format!(
                    "no answer within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                )
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    Err(format!(
        "{} not healthy within {}: {last}",
        describe(&check.probe),
        humantime::format_duration(check.timeout)
    ))
}

/// What a probe checks, for messages.
pub fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Http { url, expect, .. } => format!("GET {url} (expecting {expect})"),
        Probe::Tcp(address) => format!("TCP connect to {address}"),
    }
}

/// One probe.
pub async fn probe(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Tcp(address) => TcpStream::connect(address.as_str())
            .await
            .map(drop)
            .map_err(|err| err.to_string()),
        Probe::Http {
            address,
            host,
            path,
            expect,
            ..
        } => {
            let mut stream = TcpStream::connect(address.as_str())
                .await
                .map_err(|err| err.to_string())?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: drain-agent\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|err| err.to_string())?;
            let mut head = vec![0u8; 256];
            let mut read = 0;
            while read < head.len() && !head[..read].contains(&b'\n') {
                let n = stream
                    .read(&mut head[read..])
                    .await
                    .map_err(|err| err.to_string())?;
                if n == 0 {
                    break;
                }
                read += n;
            }
            let line = String::from_utf8_lossy(&head[..read]);
            let status = line
                .lines()
                .next()
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|code| code.parse::<u16>().ok())
                .ok_or_else(|| {
                    format!(
                        "not an HTTP response: {:?}",
                        line.lines().next().unwrap_or("")
                    )
                })?;
            if status == *expect {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn http(address: &str, expect: u16) -> Probe {
        Probe::Http {
            url: format!("http://{address}/"),
            address: address.to_string(),
            host: address.to_string(),
            path: "/".into(),
            expect,
        }
    }

    #[tokio::test]
    async fn http_probe_compares_the_status() {
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe(&http(&ok, 200)).await.unwrap();
        assert_eq!(probe(&http(&ok, 204)).await.unwrap_err(), "status 200");
        let broken = server("garbage\r\n").await;
        assert!(
            probe(&http(&broken, 200))
                .await
                .unwrap_err()
                .contains("not an HTTP response")
        );
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
    }
}
