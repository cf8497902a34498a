//! flanneld's health endpoints (`--healthz-ip`, `--healthz-port`): `/healthz` answers 200 while the
//! agent runs, `/readyz` 503 until the dataplane is programmed, the rules are in and subnet.env is
//! written, then 200 — with flanneld's bodies — and `/metrics` (ours: flanneld has none).
use std::{convert::Infallible, net::SocketAddr};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{Error, metrics};

/// The content type of the `OpenMetrics` text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` now (so a taken port is a start-up error) and serves the endpoints in the
/// background.
pub async fn serve(addr: SocketAddr) -> Result<(), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::NetlinkIo {
            context: format!("health endpoint: binding {addr}"),
            source,
        })?;
    info!(%addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("health endpoint: accepting: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let conn = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle));
                if let Err(e) = conn.await {
                    debug!(%peer, "health endpoint: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(respond(req.method(), req.uri().path()))
}

/// The answer to `method path`.
fn respond(method: &Method, path: &str) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "flanneld is running"),
        "/readyz" if metrics::is_ready() => text(StatusCode::OK, "flanneld is ready"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready yet"),
        "/metrics" => match metrics::METRICS.encode() {
            Ok(body) => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(OPENMETRICS),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_answer_as_flanneld() {
        metrics::set_ready(false);
        assert_eq!(respond(&Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(
            respond(&Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        metrics::set_ready(true);
        assert_eq!(respond(&Method::GET, "/readyz").status(), StatusCode::OK);
        let m = respond(&Method::GET, "/metrics");
        assert_eq!(m.status(), StatusCode::OK);
        assert_eq!(m.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(
            respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&Method::POST, "/healthz").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn metrics_are_openmetrics_text() {
        metrics::METRICS.leases.set(3);
        metrics::METRICS
            .lease_source_errors
            .get_or_create(&metrics::label("source", "kube"))
            .inc();
        let text = metrics::METRICS.encode().unwrap();
        assert!(text.contains("flannel_leases 3"), "{text}");
        assert!(
            text.contains("flannel_lease_source_errors_total{source=\"kube\"} 1"),
            "{text}"
        );
        assert!(text.contains("flannel_build_info{version=\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
