//! `ambassador register`: announce one backend in etcd while this process
//! lives.
//!
//! ```sh
//! ambassador register --etcd 127.0.0.1:2379 --service db --address 10.0.0.2:6379 --ttl 10s
//! ```
//!
//! puts `/ambassador/services/db/10.0.0.2:6379 = 10.0.0.2:6379` under a
//! lease of `--ttl` and keeps the lease alive (a keep-alive every third of
//! the TTL). The lease is what makes the key honest:
//!
//! - SIGTERM/SIGINT revokes it: the key disappears at once, and the
//!   process exits 0;
//! - if the process dies (SIGKILL, a crash, the host going away), nothing
//!   keeps the lease alive and etcd deletes the key after the TTL;
//! - if etcd is lost for a while, the registrar warns once and retries with
//!   a back-off; when etcd is back it keeps the same lease if it still
//!   lives, or grants a new one and puts the key again;
//! - if the lease goes while etcd is there (revoked by hand, or expired),
//!   the key went with it: one warning, a new lease, the key again.
//!
//! A bad flag is one line naming it, exit 2; an etcd that cannot be reached
//! at start is one line naming it, exit 2 too (as for a forward).

use super::etcd::{Client, connect, timed};
use super::tls::{Opt, Tls};
use super::{Backoff, Link, endpoints, key, service_name, with_scheme};
use crate::config::{Target, parse};
use clap::Parser;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "ambassador register",
    about = "Register HOST:PORT as a backend of SERVICE in etcd while this process runs."
)]
struct Args {
    /// etcd client URL(s): HOST:PORT or http://HOST:PORT, comma-separated.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// The service name (the forward's etcd://…/SERVICE).
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// The backend's address, as clients of the ambassador should reach it.
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
    /// The lease's time to live: how long the key outlives a dead process.
    #[arg(long, default_value = "10s", value_name = "DUR")]
    ttl: String,
    /// TLS: the CA of etcd's certificate (PEM); turns on https.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<String>,
    /// TLS: this client's certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<String>,
    /// TLS: this client's private key (PEM), with --etcd-cert.
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<String>,
}

/// What to register, checked.
#[derive(Debug, PartialEq)]
pub struct Registration {
    pub endpoints: Vec<String>,
    pub service: String,
    pub address: Target,
    /// Whole seconds (etcd's unit), at least 1.
    pub ttl: i64,
    /// TLS files (`--etcd-ca` …), if any.
    pub tls: Option<Tls>,
}

impl Registration {
    pub fn key(&self) -> String {
        key(&self.service, &self.address)
    }
}

/// Flags → [`Registration`]; the error is one line naming the flag.
fn check(a: &Args) -> Result<Registration, String> {
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| format!("{flag}: missing (required)"))
    };
    let etcd = need(&a.etcd, "--etcd")?;
    let tls = Tls::new(
        Opt {
            flag: "--etcd-ca",
            value: a.etcd_ca.as_deref(),
        },
        Opt {
            flag: "--etcd-cert",
            value: a.etcd_cert.as_deref(),
        },
        Opt {
            flag: "--etcd-key",
            value: a.etcd_key.as_deref(),
        },
    )?;
    let endpoints = endpoints(&etcd)
        .and_then(|e| with_scheme(&e, tls.is_some()))
        .map_err(|e| format!("--etcd: {e}"))?;
    let service = need(&a.service, "--service")?;
    service_name(&service).map_err(|e| format!("--service: {e}"))?;
    let address = need(&a.address, "--address")?;
    let address = parse::target(&address).map_err(|e| format!("--address: {e}"))?;
    let ttl = parse::duration(&a.ttl).map_err(|e| format!("--ttl: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err("--ttl: must be at least 1s".into());
    }
    // etcd counts in whole seconds: round up, never shorter than asked.
    let ttl = ttl.as_secs() as i64 + i64::from(ttl.subsec_nanos() > 0);
    Ok(Registration {
        endpoints,
        service,
        address,
        ttl,
        tls,
    })
}

/// `ambassador register …` (`args` without the program name and `register`).
/// Returns the exit code.
pub fn main(args: Vec<std::ffi::OsString>) -> u8 {
    let argv = std::iter::once("ambassador register".into()).chain(args);
    let a = Args::try_parse_from(argv).unwrap_or_else(|e| e.exit());
    let r = match check(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ambassador: error: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambassador: error: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(run(r))
}

async fn run(r: Registration) -> u8 {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ambassador: error: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let etcd = r.endpoints.join(",");
    let key = r.key();
    // The first registration decides the exit code when etcd is not there.
    let (mut client, mut lease) = match grant_and_put(&r).await {
        Ok(v) => v,
        Err(e) => {
            let e = r.tls.as_ref().map_or(e.clone(), |t| t.explain(&e));
            eprintln!("ambassador: error: --etcd {etcd}: cannot register: {e}");
            return 2;
        }
    };
    tracing::info!(%key, %etcd, ttl = r.ttl, lease = format!("{lease:x}"), "registered");
    let mut link = Link::Up;
    let mut backoff = Backoff::new();
    loop {
        let kept = tokio::select! {
            e = keep_alive(&mut client, lease, r.ttl) => e,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        // The keep-alive stream ended: etcd lost, or the lease is gone
        // (expired, or revoked by someone else: the key went with it).
        match kept {
            Ended::LeaseGone => {
                tracing::warn!(%key, %etcd, lease = format!("{lease:x}"),
                    "lease gone (expired or revoked): registering again");
            }
            Ended::Lost(error) => {
                if link.lost() {
                    tracing::warn!(%key, %etcd, %error, "etcd connection lost: retrying");
                }
            }
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff.wait()) => {}
                _ = term.recv() => return 0,
                _ = int.recv() => return 0,
            }
            match reconnect(&r, lease).await {
                Ok((c, l)) => {
                    (client, lease) = (c, l);
                    break;
                }
                Err(_) => continue,
            }
        }
        backoff.reset();
        if link.up() {
            tracing::info!(%key, %etcd, lease = format!("{lease:x}"), "etcd connection back: registered");
        } else {
            tracing::info!(%key, %etcd, lease = format!("{lease:x}"), "registered");
        }
    }
    match timed("revoking the lease", client.lease.revoke(lease)).await {
        Ok(()) => tracing::info!(%key, "deregistered: lease revoked"),
        Err(e) => tracing::warn!(%key, error = %e,
            "could not revoke the lease: the key disappears after its TTL"),
    }
    0
}

/// Connect, grant a lease, put the key under it.
async fn grant_and_put(r: &Registration) -> Result<(Client, i64), String> {
    let mut client = connect(&r.endpoints, r.tls.as_ref()).await?;
    let lease = timed("granting a lease", client.lease.grant(r.ttl))
        .await?
        .id;
    put(&mut client, r, lease).await?;
    Ok((client, lease))
}

async fn put(client: &mut Client, r: &Registration, lease: i64) -> Result<(), String> {
    let put = client
        .kv
        .do_put(r.key(), r.address.to_string())
        .with_lease(lease);
    timed("putting the key", put).await.map(|_| ())
}

/// After a lost connection: keep `lease` if etcd still has it (and put the
/// key again, in case it was deleted by hand), else a new lease.
async fn reconnect(r: &Registration, lease: i64) -> Result<(Client, i64), String> {
    let mut client = connect(&r.endpoints, r.tls.as_ref()).await?;
    let ttl = timed(
        "asking the lease's TTL",
        client.lease.get_lease_info(lease, false),
    )
    .await
    .map(|i| i.ttl)
    .unwrap_or(-1);
    if ttl > 0 {
        put(&mut client, r, lease).await?;
        return Ok((client, lease));
    }
    drop(client);
    grant_and_put(r).await
}

/// Why keeping a lease alive stopped.
enum Ended {
    /// etcd says the lease no longer exists (TTL 0).
    LeaseGone,
    /// The connection failed.
    Lost(String),
}

/// Keep `lease` alive until that fails.
async fn keep_alive(client: &mut Client, lease: i64, ttl: i64) -> Ended {
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(300));
    let mut ka = match timed("keep-alive", client.lease.keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return Ended::Lost(e),
    };
    loop {
        match timed("keep-alive", ka.message()).await {
            Ok(Some(resp)) if resp.ttl > 0 => {}
            Ok(Some(_)) => return Ended::LeaseGone,
            Ok(None) => return Ended::Lost("the keep-alive stream ended".into()),
            Err(e) => return Ended::Lost(e),
        }
        tokio::time::sleep(every).await;
        if ka.keep_alive().await.is_err() {
            // The request side closed: the stream broke (its reason, if
            // any, is the next message's error).
            return Ended::Lost(match timed("keep-alive", ka.message()).await {
                Err(e) => e,
                Ok(_) => "the keep-alive stream closed".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(etcd: &str, service: &str, address: &str, ttl: &str) -> Args {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Args {
            etcd: some(etcd),
            service: some(service),
            address: some(address),
            ttl: ttl.into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }

    #[test]
    fn flags() {
        let r = check(&args("127.0.0.1:2379", "db", "10.0.0.2:6379", "10s")).unwrap();
        assert_eq!(r.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(r.ttl, 10);
        let e = check(&args(
            "https://127.0.0.1:2379",
            "db",
            "10.0.0.2:6379",
            "10s",
        ));
        assert!(
            e.unwrap_err()
                .starts_with("--etcd: an https:// etcd endpoint needs --etcd-ca")
        );
        let mut a = args("127.0.0.1:2379", "db", "10.0.0.2:6379", "10s");
        a.etcd_cert = Some("c.pem".into());
        assert!(
            check(&a)
                .unwrap_err()
                .starts_with("--etcd-cert: needs --etcd-ca")
        );
        assert_eq!(r.key(), "/ambassador/services/db/10.0.0.2:6379");
        let r = check(&args("http://h:1", "db", "h:2", "1500ms")).unwrap();
        assert_eq!(r.ttl, 2, "rounded up");
        let e = |a: Args| check(&a).unwrap_err();
        assert!(e(args("", "db", "h:1", "10s")).starts_with("--etcd:"));
        assert!(e(args("h", "db", "h:1", "10s")).starts_with("--etcd:"));
        assert!(e(args("h:1", "", "h:1", "10s")).starts_with("--service:"));
        assert!(e(args("h:1", "a/b", "h:1", "10s")).starts_with("--service:"));
        assert!(e(args("h:1", "db", "", "10s")).starts_with("--address:"));
        assert!(e(args("h:1", "db", "h:0", "10s")).starts_with("--address:"));
        assert!(e(args("h:1", "db", "h:1", "0")).starts_with("--ttl:"));
        assert!(e(args("h:1", "db", "h:1", "5 parsecs")).starts_with("--ttl:"));
    }
}
