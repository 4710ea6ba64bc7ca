//! The admin HTTP endpoint on hyper: `/metrics` (Prometheus text, or OpenMetrics when asked),
//! `/live` and `/ready`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue, VARY},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use super::{Metrics, exposition::Format};

/// How long a client may take to send a request's head (slow or idle connections are closed).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/live` and `/ready` until the task is dropped. `refresh` runs before
/// each scrape so the kernel numbers are current.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, typically: wait instead of spinning.
                debug!(%err, "metrics listener could not accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &metrics, refresh.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(err) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%err, "metrics connection failed");
            }
        });
    }
}

/// The answer to one request.
fn answer<B>(
    request: &Request<B>,
    metrics: &Metrics,
    refresh: &(dyn Fn() + Send + Sync),
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET (or HEAD)\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            refresh();
            let accept = request
                .headers()
                .get(ACCEPT)
                .and_then(|value| value.to_str().ok());
            let format = Format::negotiate(accept);
            let body = format.render(metrics.render());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            headers.insert(VARY, HeaderValue::from_static("accept"));
            response
        }
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if metrics.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /live or /ready\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::{OPENMETRICS, PROMETHEUS_TEXT};

    async fn endpoint(metrics: Arc<Metrics>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, metrics, Arc::new(|| {})));
        format!("http://{address}")
    }

    #[tokio::test]
    async fn two_requests_on_one_connection_get_two_answers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let base = endpoint(Arc::new(Metrics::new(&["nova-api".into()], "ebpf"))).await;
        let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
            .await
            .unwrap();
        stream
            .write_all(b"GET /live HTTP/1.1\r\nHost: agent\r\n\r\nGET /ready HTTP/1.1\r\nHost: agent\r\n\r\n")
            .await
            .unwrap();
        let mut answers = String::new();
        let mut buffer = [0u8; 4096];
        while !answers.contains("not ready\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .expect("both answers within 5 s")
                .unwrap();
            assert!(read > 0, "closed after {answers:?}");
            answers.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
        assert!(answers.starts_with("HTTP/1.1 200 OK\r\n"), "{answers}");
        assert!(
            answers.contains("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answers}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_text_openmetrics_when_asked_live_and_ready() {
        let metrics = Arc::new(Metrics::new(&["nova-api".into()], "ebpf"));
        let base = endpoint(metrics.clone()).await;
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{base}{path}")).send();

        let scrape = get("/metrics").await.unwrap();
        assert_eq!(scrape.status(), 200);
        assert_eq!(scrape.headers()[CONTENT_TYPE], PROMETHEUS_TEXT);
        let body = scrape.text().await.unwrap();
        assert!(
            body.contains("# TYPE drain_agent_operations_total counter"),
            "{body}"
        );
        assert!(!body.contains("# EOF"), "{body}");

        let scrape = client
            .get(format!("{base}/metrics"))
            .header(ACCEPT, "application/openmetrics-text;version=1.0.0")
            .send()
            .await
            .unwrap();
        assert_eq!(scrape.headers()[CONTENT_TYPE], OPENMETRICS);
        let body = scrape.text().await.unwrap();
        assert!(
            body.contains("# TYPE drain_agent_operations counter"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        assert_eq!(get("/live").await.unwrap().status(), 200);
        assert_eq!(get("/ready").await.unwrap().status(), 503);
        metrics.set_ready(true);
        assert_eq!(get("/ready").await.unwrap().status(), 200);
        assert_eq!(get("/ready?verbose").await.unwrap().status(), 200);
        assert_eq!(get("/nope").await.unwrap().status(), 404);
        let post = client.post(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
    }
}
