//! etcd's JSON gateway (`/v3/kv/*` over HTTP/1.1), as much as the discovery
//! driver needs: put, delete a prefix, and a range to see etcd answer.
//!
//! The driver talks HTTP rather than gRPC so that the change it times is
//! one small request on a kept-alive connection (ureq's agent pools it),
//! not a process start (`etcdctl`) or a second gRPC stack beside the one
//! under test. Keys and values travel base64-encoded, as the gateway wants.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::time::Duration;

pub struct Gateway {
    agent: ureq::Agent,
    base: String,
}

impl Gateway {
    /// The gateway of the etcd whose client URL is `http://127.0.0.1:PORT`.
    pub fn new(port: u16) -> Gateway {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        Gateway {
            agent,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .agent
            .post(&url)
            .send_json(body)
            .with_context(|| format!("POST {url}"))?;
        resp.into_json()
            .with_context(|| format!("POST {url}: reply"))
    }

    /// Does etcd answer (a range of one key)?
    pub fn answers(&self) -> bool {
        self.call("/v3/kv/range", json!({ "key": B64.encode("x") }))
            .is_ok()
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        self.call("/v3/kv/put", body).map(drop)
    }

    /// Delete every key starting with `prefix` (which ends in `/`).
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        anyhow::ensure!(prefix.ends_with('/'), "prefix {prefix:?} must end in /");
        // The range end of a prefix ending in '/': '/' + 1 = '0'.
        let end = format!("{}0", &prefix[..prefix.len() - 1]);
        let body = json!({ "key": B64.encode(prefix), "range_end": B64.encode(end) });
        self.call("/v3/kv/deleterange", body).map(drop)
    }
}
