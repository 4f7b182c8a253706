//! TLS to etcd, with client certificates.
//!
//! etcd started with `--cert-file --key-file --trusted-ca-file
//! --client-cert-auth` speaks only TLS and asks every client for a
//! certificate signed by its CA. The ambassador (forward watchers and
//! `ambassador register`) takes three files, as flags or config keys:
//!
//! | flag | config key | what |
//! |---|---|---|
//! | `--etcd-ca FILE` | `etcd_ca` | PEM CA that signed etcd's certificate (turns TLS on) |
//! | `--etcd-cert FILE` | `etcd_cert` | PEM client certificate (with `--etcd-key`) |
//! | `--etcd-key FILE` | `etcd_key` | PEM private key of the client certificate |
//!
//! The rules ([`Tls::new`], no I/O but reading the files): the CA turns
//! TLS on (the binary has no root store, so an `https://` endpoint without
//! it is an error); cert and key come together; each file must be readable
//! and hold a PEM block, checked at start (one line naming the flag, exit
//! 2). Only **paths** are kept and shown (`--check`, logs, `Debug`): the
//! files are read again at each connect (a renewed certificate is picked
//! up at the next reconnect), and their contents never reach a message.
//!
//! The transport is tonic's `tls` feature (rustls with ring): the channel
//! is ours already (`etcd::connect`), so it only gets a `ClientTlsConfig`.

use std::path::PathBuf;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The TLS files (paths only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    /// The client certificate and its key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// One file option: its flag name (for messages) and its value.
pub struct Opt<'a> {
    pub flag: &'a str,
    pub value: Option<&'a str>,
}

impl Tls {
    /// The three options → TLS settings (`None`: plain http), each file
    /// checked. The error is one line naming the flag (or key).
    pub fn new(ca: Opt, cert: Opt, key: Opt) -> Result<Option<Tls>, String> {
        let Some(ca_path) = ca.value else {
            if let Some(o) = [&cert, &key].into_iter().find(|o| o.value.is_some()) {
                return Err(format!(
                    "{}: needs {} too (the CA of etcd's certificate)",
                    o.flag, ca.flag
                ));
            }
            return Ok(None);
        };
        let identity = match (cert.value, key.value) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => return Err(format!("{}: needs {} too", cert.flag, key.flag)),
            (None, Some(_)) => return Err(format!("{}: needs {} too", key.flag, cert.flag)),
        };
        check_file(ca.flag, ca_path, "CERTIFICATE")?;
        if let Some((c, k)) = identity {
            check_file(cert.flag, c, "CERTIFICATE")?;
            check_file(key.flag, k, "PRIVATE KEY")?;
        }
        Ok(Some(Tls {
            ca: ca_path.into(),
            identity: identity.map(|(c, k)| (c.into(), k.into())),
        }))
    }

    /// tonic's TLS settings, the files read now. The error names a path,
    /// never a file's contents.
    pub fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(c)
    }
}

impl Tls {
    /// `error` of a first call over TLS, with a hint when etcd only dropped
    /// the connection. Under `--client-cert-auth`, TLS 1.3 checks the
    /// client certificate after the handshake: a missing or refused one
    /// closes the connection, and the call sees nothing but `operation was
    /// canceled` or `transport error`. The hint names the certificate's
    /// path (never its contents).
    pub fn explain(&self, error: &str) -> String {
        let dropped = ["operation was canceled", "transport error"]
            .iter()
            .any(|p| error.ends_with(p));
        if !dropped {
            return error.to_string();
        }
        match &self.identity {
            None => format!(
                "{error} (etcd closed the TLS connection: does it require a client \
                 certificate? give --etcd-cert and --etcd-key)"
            ),
            Some((cert, _)) => format!(
                "{error} (etcd closed the TLS connection: does it refuse the client \
                 certificate {}? it must be signed by a CA in etcd's --trusted-ca-file)",
                cert.display()
            ),
        }
    }
}

/// Readable and with a PEM block of this kind (`PRIVATE KEY` also matches
/// `RSA PRIVATE KEY`, `EC PRIVATE KEY`).
fn check_file(flag: &str, path: &str, kind: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {path}: cannot read: {e}"))?;
    match has_pem(&bytes, kind) {
        true => Ok(()),
        false => Err(format!("{flag} {path}: no PEM {kind} block in the file")),
    }
}

/// Does the text hold a `-----BEGIN …KIND-----` line?
pub fn has_pem(bytes: &[u8], kind: &str) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("-----BEGIN ") && l.ends_with(&format!("{kind}-----"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt<'a>(flag: &'a str, value: Option<&'a str>) -> Opt<'a> {
        Opt { flag, value }
    }

    #[test]
    fn pem_blocks() {
        assert!(has_pem(
            b"x\n-----BEGIN CERTIFICATE-----\nAA\n",
            "CERTIFICATE"
        ));
        assert!(has_pem(b"-----BEGIN EC PRIVATE KEY-----", "PRIVATE KEY"));
        assert!(has_pem(b"-----BEGIN PRIVATE KEY-----\r\n", "PRIVATE KEY"));
        assert!(!has_pem(b"-----BEGIN CERTIFICATE-----", "PRIVATE KEY"));
        assert!(!has_pem(b"secret", "CERTIFICATE"));
    }

    #[test]
    fn options_go_together() {
        let none = Tls::new(opt("--ca", None), opt("--cert", None), opt("--key", None));
        assert_eq!(none, Ok(None));
        let e = Tls::new(
            opt("--ca", None),
            opt("--cert", Some("c")),
            opt("--key", None),
        );
        assert!(e.unwrap_err().starts_with("--cert: needs --ca"));
        let e = Tls::new(
            opt("--ca", Some("a")),
            opt("--cert", Some("c")),
            opt("--key", None),
        );
        assert!(e.unwrap_err().starts_with("--cert: needs --key"));
        let e = Tls::new(
            opt("--ca", Some("a")),
            opt("--cert", None),
            opt("--key", Some("k")),
        );
        assert!(e.unwrap_err().starts_with("--key: needs --cert"));
        let e = Tls::new(
            opt("--ca", Some("/nonexistent/ca.pem")),
            opt("--cert", None),
            opt("--key", None),
        );
        assert!(
            e.unwrap_err()
                .starts_with("--ca /nonexistent/ca.pem: cannot read")
        );
    }

    #[test]
    fn a_dropped_call_gets_a_hint_naming_the_certificate() {
        let mut t = Tls {
            ca: "/ca.pem".into(),
            identity: None,
        };
        let e = t.explain("reading the prefix: operation was canceled");
        assert!(e.contains("require a client certificate"), "{e}");
        t.identity = Some(("/c.pem".into(), "/k.pem".into()));
        let e = t.explain("granting a lease: transport error");
        assert!(e.contains("refuse the client certificate /c.pem"), "{e}");
        assert!(!e.contains("/k.pem"), "{e}");
        let clear = "h: transport error: invalid peer certificate: UnknownIssuer";
        assert_eq!(t.explain(clear), clear);
    }

    #[test]
    fn a_file_without_pem_is_named_not_shown() {
        let dir = std::env::temp_dir().join(format!("ambassador-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key.pem");
        std::fs::write(&p, "hunter2-secret").unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let e = Tls::new(
            opt("--ca", ca.to_str()),
            opt("--cert", ca.to_str()),
            opt("--key", p.to_str()),
        )
        .unwrap_err();
        assert!(
            e.starts_with("--key ") && e.contains("no PEM PRIVATE KEY"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
