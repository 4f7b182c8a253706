//! The small HTTP server behind `--metrics ADDR:PORT`.
//!
//! It runs on its own thread with `tiny_http` (blocking, no async runtime
//! of its own, a handful of dependencies), so a slow scraper never stalls
//! the proxy's event loop, and the proxy's single-threaded runtime needs no
//! `Send` types. Three paths, all `GET`:
//!
//! - `/metrics`: Prometheus text format 0.0.4, see [`crate::exporter`];
//! - `/healthz`: 200 while the process runs;
//! - `/readyz`: 200 once every listener is bound and the engine chosen,
//!   503 before that and while draining.
//!
//! Anything else is 404. The address must be loopback unless
//! `--metrics-public` is given (checked in [`metrics_addr`]), because the
//! metrics name every forward and backend.

use crate::exporter::{self, Registry};
use std::net::SocketAddr;
use std::time::Duration;

/// `--metrics ADDR:PORT` → the address; a non-loopback one only with
/// `--metrics-public`. Errors are one line naming the flag.
pub fn metrics_addr(flag: Option<&str>, public: bool) -> Result<Option<SocketAddr>, String> {
    let Some(v) = flag else {
        if public {
            return Err("--metrics-public: needs --metrics ADDR:PORT".into());
        }
        return Ok(None);
    };
    let addr: SocketAddr = v
        .parse()
        .map_err(|_| format!("--metrics {v}: expected ADDR:PORT, like 127.0.0.1:9090"))?;
    if addr.port() == 0 {
        return Err(format!("--metrics {v}: port 0 is out of range 1-65535"));
    }
    if !addr.ip().is_loopback() && !public {
        return Err(format!(
            "--metrics {v}: not a loopback address; add --metrics-public to serve metrics on it"
        ));
    }
    Ok(Some(addr))
}

/// Bind `addr` and serve the global registry on a new thread.
pub fn start(addr: SocketAddr) -> Result<(), String> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
    tracing::info!(listen = %addr, "metrics listening");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve(server, exporter::global()))
        .map_err(|e| format!("--metrics {addr}: cannot start its thread: {e}"))?;
    Ok(())
}

fn serve(server: tiny_http::Server, registry: &Registry) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let get = *req.method() == tiny_http::Method::Get;
        let (code, body, ctype) = match (get, path.as_str()) {
            (true, "/metrics") => {
                registry.refresh(Duration::from_secs(1));
                (200, registry.render(), "text/plain; version=0.0.4")
            }
            (true, "/healthz") => (200, "ok\n".to_string(), "text/plain"),
            (true, "/readyz") if registry.is_ready() => (200, "ready\n".into(), "text/plain"),
            (true, "/readyz") => (503, "not ready\n".into(), "text/plain"),
            (false, _) => (405, "only GET\n".into(), "text/plain"),
            _ => (404, "not found\n".into(), "text/plain"),
        };
        let header = tiny_http::Header::from_bytes("Content-Type", ctype).expect("valid header");
        let resp = tiny_http::Response::from_string(body)
            .with_status_code(code)
            .with_header(header);
        if let Err(e) = req.respond(resp) {
            tracing::debug!(error = %e, "metrics: could not answer a request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_unless_public() {
        assert_eq!(metrics_addr(None, false), Ok(None));
        assert!(
            metrics_addr(Some("127.0.0.1:9090"), false)
                .unwrap()
                .is_some()
        );
        assert!(metrics_addr(Some("[::1]:9090"), false).unwrap().is_some());
        let e = metrics_addr(Some("0.0.0.0:9090"), false).unwrap_err();
        assert!(e.starts_with("--metrics 0.0.0.0:9090: "), "{e}");
        assert!(e.contains("--metrics-public"), "{e}");
        assert!(metrics_addr(Some("0.0.0.0:9090"), true).unwrap().is_some());
        assert!(metrics_addr(Some("localhost:9090"), false).is_err());
        assert!(metrics_addr(None, true).is_err());
    }
}
