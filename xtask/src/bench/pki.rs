//! Certificates for the discovery driver's `--tls` run: the test PKI of
//! `ambassador_test_support::pki` (as `tests/etcd_tls.rs` uses it): a CA
//! (`ca.pem`), etcd's server certificate (`server.pem`, SAN 127.0.0.1) and a
//! client certificate (`client.pem`), each with a P-256 key (`NAME.key`),
//! valid 2 days.

use anyhow::{Context, Result};
use std::path::Path;

/// Make `ca`, `server` and `client` in `dir`.
pub fn make(dir: &Path) -> Result<()> {
    ambassador_test_support::pki::make(dir)
        .with_context(|| format!("test certificates in {}", dir.display()))
}
