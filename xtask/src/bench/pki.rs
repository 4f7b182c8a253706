//! Certificates for the discovery driver's `--tls` run, made with `openssl`
//! as `tests/etcd_tls.rs` makes them: a CA (`ca.pem`), etcd's server
//! certificate (`server.pem`, SAN 127.0.0.1) and a client certificate
//! (`client.pem`), each with a P-256 key (`NAME.key`), valid 2 days.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// Make `ca`, `server` and `client` in `dir`.
pub fn make(dir: &Path) -> Result<()> {
    key(dir, "ca")?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    let sign = "keyUsage=critical,digitalSignature\n";
    cert(
        dir,
        "server",
        &format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n{sign}"),
    )?;
    cert(
        dir,
        "client",
        &format!("extendedKeyUsage=clientAuth\n{sign}"),
    )
}

fn key(dir: &Path, name: &str) -> Result<()> {
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

/// `NAME.pem` signed by the CA, with the extensions `ext` (one a line).
fn cert(dir: &Path, name: &str, ext: &str) -> Result<()> {
    key(dir, name)?;
    let (k, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let subj = format!("/CN={name}");
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
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    )
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("openssl (apt-get install openssl)")?;
    anyhow::ensure!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
