//! How the ambassador reads its configuration, shown through `--check` (which
//! prints the forwards and binds nothing) and through the exact one-line
//! errors a user sees, with exit code 2.

mod support;

use std::process::Command;
use support::{BIN, run_with_env};

/// The rows of the `--check` table, without the header.
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("skipped "))
        .map(|l| {
            // The source may contain one space (`--forward X`, `args H P`).
            let cols: Vec<&str> = l.split("  ").filter(|c| !c.is_empty()).collect();
            cols.iter().map(|c| c.trim().to_string()).collect()
        })
        .collect()
}

/// A bad-input run: exit 2 and exactly one line on stderr.
fn error(env: &[(&str, &str)], args: &[&str]) -> String {
    let (code, stdout, stderr) = run_with_env(env, args);
    assert_eq!(code, 2, "stdout={stdout} stderr={stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr.trim_end().to_string()
}

#[test]
fn classic_link_variables() {
    // What `docker run --link db:db` injects for a redis container.
    let env = [
        ("DB_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
        ("DB_PORT_6379_TCP_ADDR", "172.17.0.2"),
        ("DB_PORT_6379_TCP_PORT", "6379"),
        ("DB_PORT_6379_TCP_PROTO", "tcp"),
        ("DB_PORT", "tcp://172.17.0.2:6379"),
        ("DB_NAME", "/amb/db"),
        ("DB_ENV_REDIS_VERSION", "7.0"),
    ];
    let (code, out, _) = run_with_env(&env, &["--check"]);
    assert_eq!(code, 0);
    assert_eq!(
        rows(&out),
        vec![vec![
            "DB_PORT_6379_TCP",
            "0.0.0.0:6379",
            "172.17.0.2:6379",
            "tcp"
        ]]
    );
    assert!(out.starts_with("SOURCE"), "{out}");
}

#[test]
fn listen_port_is_taken_from_the_name() {
    // The 2014 walkthrough tells ambassador1 the remote address by hand.
    let (code, out, _) = run_with_env(
        &[("REDIS_PORT_1234_TCP", "tcp://192.168.1.52:6379")],
        &["--check"],
    );
    assert_eq!(code, 0);
    assert_eq!(rows(&out)[0][1..3], ["0.0.0.0:1234", "192.168.1.52:6379"]);
}

#[test]
fn linked_containers_own_env_and_udp_are_skipped_out_loud() {
    let env = [
        ("DB_PORT_5432_TCP", "tcp://172.17.0.3:5432"),
        ("DB_ENV_OTHER_PORT_80_TCP", "tcp://10.9.9.9:80"),
        ("DNS_PORT_53_UDP", "udp://172.17.0.4:53"),
    ];
    let (code, out, _) = run_with_env(&env, &["--check"]);
    assert_eq!(code, 0);
    assert_eq!(rows(&out).len(), 1);
    assert!(
        out.contains("skipped DB_ENV_OTHER_PORT_80_TCP: a linked container's own"),
        "{out}"
    );
    assert!(out.contains("skipped DNS_PORT_53_UDP: only TCP"), "{out}");
}

#[test]
fn port_ranges_give_one_forward_per_port_and_ignore_start_end() {
    let env = [
        ("APP_PORT_7000_TCP", "tcp://172.17.0.5:7000"),
        ("APP_PORT_7001_TCP", "tcp://172.17.0.5:7001"),
        ("APP_PORT_7002_TCP", "tcp://172.17.0.5:7002"),
        ("APP_PORT_7000_TCP_START", "tcp://172.17.0.5:7000"),
        ("APP_PORT_7000_TCP_END", "tcp://172.17.0.5:7002"),
        ("APP_PORT_7000_TCP_PORT_START", "7000"),
        ("APP_PORT_7000_TCP_PORT_END", "7002"),
    ];
    let (code, out, _) = run_with_env(&env, &["--check"]);
    assert_eq!(code, 0);
    let listen: Vec<String> = rows(&out).iter().map(|r| r[1].clone()).collect();
    assert_eq!(listen, ["0.0.0.0:7000", "0.0.0.0:7001", "0.0.0.0:7002"]);
}

#[test]
fn forward_flags_ipv6_hostnames_and_positional() {
    let (code, out, _) = run_with_env(
        &[],
        &[
            "--check",
            "--forward",
            "[::1]:7000=[::1]:6379",
            "--forward",
            "127.0.0.1:7001=db.internal:5432",
            "--forward",
            "7002=10.0.0.2:80",
            "10.0.0.9",
            "6380",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let r = rows(&out);
    assert_eq!(r[0][1..3], ["[::1]:7000", "[::1]:6379"]);
    assert_eq!(r[1][1..3], ["127.0.0.1:7001", "db.internal:5432"]);
    assert_eq!(r[2][1..3], ["0.0.0.0:7002", "10.0.0.2:80"]);
    assert_eq!(
        r[3],
        ["args 10.0.0.9 6380", "0.0.0.0:6380", "10.0.0.9:6380", "tcp"]
    );
}

#[test]
fn no_forwards_says_what_was_looked_for() {
    assert_eq!(
        error(&[("PATH", "/bin")], &[]),
        "ambassador: error: no forwards configured: looked for \
         <ALIAS>_PORT_<n>_TCP=tcp://<host>:<port> variables (as set by `docker run --link`), \
         --forward flags and HOST PORT arguments"
    );
}

#[test]
fn malformed_values_name_the_variable() {
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "172.17.0.2:6379")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: value \"172.17.0.2:6379\" is not tcp://HOST:PORT"
    );
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "tcp://172.17.0.2")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: \"172.17.0.2\": expected HOST:PORT"
    );
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "tcp://fe80::1:6379")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: \"fe80::1:6379\": IPv6 addresses must be in brackets, like [::1]:6379"
    );
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "tcp://999.1.1.1:6379")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: \"999.1.1.1\" is not a valid IPv4 address"
    );
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "tcp://bad host:6379")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: \"bad host\" is not a valid host name or address"
    );
}

#[test]
fn ports_out_of_range() {
    assert_eq!(
        error(&[("DB_PORT_0_TCP", "tcp://172.17.0.2:6379")], &[]),
        "ambassador: error: DB_PORT_0_TCP: port 0 is out of range 1-65535"
    );
    assert_eq!(
        error(&[("DB_PORT_70000_TCP", "tcp://172.17.0.2:6379")], &[]),
        "ambassador: error: DB_PORT_70000_TCP: port 70000 is out of range 1-65535"
    );
    assert_eq!(
        error(&[("DB_PORT_6379_TCP", "tcp://172.17.0.2:65536")], &[]),
        "ambassador: error: DB_PORT_6379_TCP: port 65536 is out of range 1-65535"
    );
    assert_eq!(
        error(&[], &["--forward", "0=db:1"]),
        "ambassador: error: --forward 0=db:1: port 0 is out of range 1-65535"
    );
}

#[test]
fn duplicate_listen_addresses_name_both_sources() {
    assert_eq!(
        error(
            &[
                ("A_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
                ("B_PORT_6379_TCP", "tcp://172.17.0.3:6379")
            ],
            &[]
        ),
        "ambassador: error: A_PORT_6379_TCP and B_PORT_6379_TCP both listen on 0.0.0.0:6379 (port 6379): remove one"
    );
    assert_eq!(
        error(
            &[("A_PORT_80_TCP", "tcp://172.17.0.2:80")],
            &["--forward", "127.0.0.1:80=x:1"]
        ),
        "ambassador: error: A_PORT_80_TCP and --forward 127.0.0.1:80=x:1 both listen on 127.0.0.1:80 (port 80): remove one"
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let (code, _, err) = run_with_env(&[], &["--forward", "1=a:1", "--mode", "turbo"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'turbo' for '--mode"), "{err}");
    assert_eq!(
        error(&[], &["--forward", "1=a:1", "--connect-timeout", "soon"]),
        "ambassador: error: --connect-timeout: \"soon\" is not a duration (like 5s, 250ms, 2m)"
    );
    assert_eq!(
        error(&[], &["onlyhost"]),
        "ambassador: error: HOST PORT arguments: got only \"onlyhost\"; expected a host and a port"
    );
}

#[test]
fn a_listener_that_cannot_bind_stops_the_whole_start() {
    // Occupy one port; the other forward must not be left running alone.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let free = support::free_port();
    let (code, _, err) = run_with_env(
        &[],
        &[
            "--mode",
            "epoll",
            "--forward",
            &format!("127.0.0.1:{free}=127.0.0.1:9"),
            "--forward",
            &format!("127.0.0.1:{busy_port}=127.0.0.1:9"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "--forward 127.0.0.1:{busy_port}=127.0.0.1:9: cannot listen on 127.0.0.1:{busy_port}: Address already in use"
        )),
        "{err}"
    );
    assert!(!err.contains(" ready "), "{err}");
}

#[test]
fn hostnames_are_resolved_per_connection() {
    use std::io::{Read, Write};
    // `localhost` resolves at connect time; an unknown name fails that
    // connection only, with a log line naming it.
    let echo = support::echo_server();
    let p = support::Proxy::forward("epoll", &format!("localhost:{echo}"), &[]);
    let mut c = p.connect();
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");

    let p = support::Proxy::forward("epoll", "no-such-host.invalid:80", &[]);
    let mut c = p.connect();
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    assert!(
        p.wait_log("resolving no-such-host.invalid", 10),
        "{}",
        p.log()
    );
}

#[test]
fn json_logs() {
    let echo = support::echo_server();
    let port = support::free_port();
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args([
        "--mode",
        "epoll",
        "--log-format",
        "json",
        "--forward",
        &format!("127.0.0.1:{port}=127.0.0.1:{echo}"),
    ]);
    let p = support::Proxy::spawn(cmd, port).expect("ready");
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("engine chosen"))
        .expect("engine line");
    assert!(
        line.starts_with('{') && line.contains("\"engine\":\"epoll\""),
        "{line}"
    );
}
