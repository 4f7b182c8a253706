//! Docker discovery and etcd TLS: the flags' validation (bad input is one
//! line naming the flag, exit 2; no secret in `--check`).
//!
//! Still to come (see the report on the `docker` branch): the live tests
//! against a real dockerd (labelled containers, stop/start followed) and a
//! real etcd with `--client-cert-auth`.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ambassador"))
        .arg("--no-env")
        .args(args)
        .output()
        .expect("run ambassador")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_docker_forward_needs_the_docker_flag() {
    let o = run(&["--forward", "17000=docker://db"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("--forward 17000=docker://db") && e.contains("--docker"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_missing_docker_socket_is_one_line_and_exit_2() {
    let o = run(&[
        "--docker",
        "/nonexistent/docker.sock",
        "--forward",
        "17001=docker://db",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("cannot reach docker at /nonexistent/docker.sock"),
        "{e}"
    );
}

#[test]
fn check_shows_a_docker_forward_without_contacting_docker() {
    let o = run(&[
        "--check",
        "--docker",
        "/nonexistent.sock",
        "--forward",
        "17002=docker://db",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("docker://db"));
}

#[test]
fn a_missing_tls_file_names_the_flag() {
    let o = run(&[
        "--etcd-ca",
        "/nonexistent/ca.pem",
        "--forward",
        "17003=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("ambassador: error: --etcd-ca /nonexistent/ca.pem: cannot read")
    );
    let o = run(&[
        "--etcd-cert",
        "/tmp/c.pem",
        "--forward",
        "17003=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--etcd-cert: needs --etcd-ca"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn key_contents_never_reach_check_or_errors() {
    let dir = std::env::temp_dir().join(format!("ambassador-tls-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nc2VjcmV0Q0E=\n").unwrap();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nc2VjcmV0Q0VSVA==\n").unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nS3VwZXJTZWNyZXRLZXk=\n").unwrap();
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let o = run(&[
        "--check",
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        key,
        "--forward",
        "17004=etcd://127.0.0.1:1/db",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(all.contains("etcd://127.0.0.1:1/db"), "{all}");
    assert!(
        !all.contains("S3VwZXJTZWNyZXRLZXk") && !all.contains("BEGIN"),
        "{all}"
    );
    // A key file that is not PEM: named, its contents not shown.
    std::fs::write(dir.join("bad.pem"), "hunter2").unwrap();
    let bad = dir.join("bad.pem");
    let o = run(&[
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        bad.to_str().unwrap(),
        "--forward",
        "17004=etcd://127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--etcd-key") && !stderr(&o).contains("hunter2"),
        "{}",
        stderr(&o)
    );
    // Credentials in the URL are refused without being echoed.
    let o = run(&[
        "--check",
        "--forward",
        "17005=etcd://u:pa55word@127.0.0.1:1/db",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("pa55word"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
