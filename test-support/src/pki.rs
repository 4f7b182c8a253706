//! A test PKI made with the `openssl` command: a CA, certificates it signs, and the P-256 keys
//! behind them, as files in a directory the caller owns.
//!
//! Real TLS needs real certificates, and a test must not depend on files checked in that expire
//! or leak: so each run makes its own, valid 2 days, in a fresh directory. The pieces:
//!
//! - [`ca`]`(dir, "ca")`: a self-signed CA, `ca.key` and `ca.pem`;
//! - [`cert`]`(dir, "server", "ca", SERVER)`: `server.key` and `server.pem`, signed by `ca`, with
//!   the X.509 extensions given (one a line, as `openssl x509 -extfile` reads them);
//! - [`SERVER`] (SAN 127.0.0.1, TLS server) and [`CLIENT`] (TLS client): the two extension sets a
//!   loopback etcd and its clients need;
//! - [`make`]: the usual three at once, `ca`, `server` and `client`.
//!
//! A second CA (for a "certificate of a stranger" case) is one more [`ca`] and [`cert`] call.
//! Every call says which `openssl` invocation failed and what it printed.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// How long every certificate is valid (`openssl -days`).
const DAYS: &str = "2";

/// Extensions of a loopback TLS server's certificate (SAN `IP:127.0.0.1`).
pub const SERVER: &str = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
                          keyUsage=critical,digitalSignature\n";

/// Extensions of a TLS client certificate.
pub const CLIENT: &str = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n";

/// Make `ca` (the CA), `server` ([`SERVER`]) and `client` ([`CLIENT`]) in `dir`, both signed
/// by `ca`: `NAME.key` and `NAME.pem` each.
pub fn make(dir: &Path) -> io::Result<()> {
    ca(dir, "ca")?;
    cert(dir, "server", "ca", SERVER)?;
    cert(dir, "client", "ca", CLIENT)
}

/// A self-signed CA in `dir`: `NAME.key`, `NAME.pem` (subject `CN=NAME`).
pub fn ca(dir: &Path, name: &str) -> io::Result<()> {
    key(dir, name)?;
    let (k, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &k,
            "-out",
            &pem,
            "-days",
            DAYS,
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

/// A certificate `NAME.pem` (key `NAME.key`, subject `CN=NAME`) in `dir`, signed by the CA `by`
/// (made by [`ca`] in the same `dir`), with the extensions `ext` (one a line).
pub fn cert(dir: &Path, name: &str, by: &str, ext: &str) -> io::Result<()> {
    key(dir, name)?;
    let (k, csr, pem, extfile, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
        format!("/CN={name}"),
    );
    let (ca_pem, ca_key) = (format!("{by}.pem"), format!("{by}.key"));
    openssl(
        dir,
        &["req", "-new", "-key", &k, "-out", &csr, "-subj", &subj],
    )?;
    std::fs::write(dir.join(&extfile), ext)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            DAYS,
            "-extfile",
            &extfile,
        ],
    )
}

/// A new P-256 key in `dir`: `NAME.key` (PKCS#8 PEM, unencrypted).
pub fn key(dir: &Path, name: &str) -> io::Result<()> {
    let out = format!("{name}.key");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &out,
        ],
    )
}

/// `openssl ARGS` in `dir`: an error naming the arguments and openssl's stderr unless it exits 0.
fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("openssl (apt-get install openssl): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key files exist, and `openssl verify` accepts server and client under the CA
    /// (and a certificate of another CA is refused: the chain is real, not just files).
    #[test]
    fn make_gives_a_chain_openssl_verifies() {
        let dir = std::env::temp_dir().join(format!("ambassador-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make(&dir).unwrap();
        ca(&dir, "other").unwrap();
        cert(&dir, "stranger", "other", CLIENT).unwrap();
        let verify = |leaf: &str| {
            Command::new("openssl")
                .args(["verify", "-CAfile", "ca.pem", leaf])
                .current_dir(&dir)
                .output()
                .unwrap()
                .status
                .success()
        };
        let ok = (
            verify("server.pem"),
            verify("client.pem"),
            verify("stranger.pem"),
        );
        let keys = ["ca", "server", "client"].map(|n| dir.join(format!("{n}.key")).is_file());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(ok, (true, true, false));
        assert_eq!(keys, [true; 3]);
    }

    #[test]
    fn a_failing_openssl_is_named() {
        let dir = std::env::temp_dir().join(format!("ambassador-pki-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // No CA `nobody` in the directory: the signing step fails.
        let e = cert(&dir, "x", "nobody", CLIENT).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.to_string().contains("openssl [\"x509\""), "{e}");
    }
}
