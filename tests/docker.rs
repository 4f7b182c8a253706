//! The ambassador as users run it: the FROM-scratch image under real Docker, between a real
//! redis container and an app container, configured by `--link` alone (Docker ≤ 28) or by a
//! hand-set `-e DB_PORT_6379_TCP=...` (Docker ≥ 29 style); plus what the in-kernel engine
//! needs from Docker and what `--mode auto` does without it.
//!
//! Needs root. Starts dockerd if it is not running (installing docker.io if missing); every
//! image is built FROM scratch from host files, nothing is pulled. Containers are removed even
//! when an assertion fails.

mod support_docker;

use std::process::Command;
use std::time::Duration;
use support_docker::docker::{
    Containers, ambassador_image, docker, ensure_dockerd, exit_code, image_size, ip_of, logs,
    redis_image, wait_log,
};
use support_docker::{chosen_engine, field, ok, poll, random_bytes};

const READY: Duration = Duration::from_secs(20);
const APP: Duration = Duration::from_secs(60);

/// The exact minimum the sockmap engine needs under Docker 20.10, found on Linux 6.18: CAP_SYS_ADMIN
/// and nothing else (`kernel.unprivileged_bpf_disabled=2`; Docker 20.10 cannot grant CAP_BPF;
/// the default seccomp profile allows bpf(2) only with CAP_SYS_ADMIN; the sockmap program type
/// needs CAP_NET_ADMIN *or* CAP_SYS_ADMIN). NET_ADMIN alone is not enough. See docs/walkthrough.md.
const SOCKMAP_CAPS: &[&str] = &["--cap-drop", "ALL", "--cap-add", "SYS_ADMIN"];

/// SET a 1 MiB random value through `-h host -p port` from an app container, GET it back the
/// same way, and assert the bytes are identical. `net` are the app container's extra `docker run`
/// arguments (a `--link`).
fn round_trip(net: &[&str], host: &str, port: &str, key: &str, seed: u64) {
    let value = random_bytes(1 << 20, seed);
    let app = |extra: &[&str], stdin: Option<&[u8]>| {
        let mut args = vec!["run", "--rm", "-i"];
        args.extend_from_slice(net);
        args.extend_from_slice(&[
            "--entrypoint",
            "/usr/bin/redis-cli",
            redis_image(),
            "-h",
            host,
            "-p",
            port,
        ]);
        args.extend_from_slice(extra);
        ok(Command::new("docker").args(&args), stdin, APP)
    };
    let set = app(&["-x", "SET", key], Some(&value));
    assert_eq!(
        set.stdout_str().trim(),
        "OK",
        "SET through the ambassador: {}",
        set.stderr
    );
    let got = app(&["GET", key], None).stdout;
    // redis-cli writing to a pipe prints the raw value and one newline.
    assert_eq!(
        got.len(),
        value.len() + 1,
        "GET returned {} bytes, expected {}",
        got.len(),
        value.len() + 1
    );
    assert!(
        got[..value.len()] == value[..],
        "GET through the ambassador is not byte-exact"
    );
}

/// The `stats` line the ambassador logs on SIGUSR1, for the forward `source`: (conns_total,
/// bytes_to_upstream).
fn stats(container: &str, source: &str) -> (u64, u64) {
    docker(&["kill", "-s", "USR1", container]);
    let line = poll(Duration::from_secs(5), || {
        logs(container)
            .lines()
            .rev()
            .find(|l| l.contains("stats") && field(l, "forward") == Some(source))
            .map(String::from)
    })
    .unwrap_or_else(|| {
        panic!(
            "no stats line for {source} after SIGUSR1:\n{}",
            logs(container)
        )
    });
    let num = |k: &str| -> u64 {
        field(&line, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    // Bytes the sockmap engine splices in the kernel are counted apart from the copied ones.
    (
        num("conns_total"),
        num("bytes_to_upstream") + num("spliced_to_upstream"),
    )
}

/// `docker run --link db:db ambassador` and nothing else: the classic ambassador. The app links
/// to the ambassador under the alias `db`, so `db` resolves to the ambassador, and a 1 MiB value
/// makes the round trip byte-exact; the log names the engine and the forward it derived from
/// the link variable; the image is FROM scratch with one file and under 10 MB.
#[test]
fn link_only() {
    ensure_dockerd();
    let (redis, amb) = (redis_image(), ambassador_image());
    let size = image_size(amb);
    eprintln!("image {amb}: {size} bytes");
    assert!(
        size < 10_000_000,
        "ambassador image is {size} bytes, over 10 MB"
    );
    let layers = docker(&["history", "-q", "--no-trunc", amb]).stdout_str();
    assert!(
        layers.lines().count() <= 3,
        "expected FROM scratch + COPY (+ metadata):\n{layers}"
    );

    let mut c = Containers::new();
    let db = c.run("amb-e2e-db-", &[redis]);
    let ambc = c.run("amb-e2e-amb-", &["--link", &format!("{db}:db"), amb]);
    let log = wait_log(&ambc, "ready forwards=1", READY);
    let engine =
        chosen_engine(&log).unwrap_or_else(|| panic!("log does not name the engine:\n{log}"));
    assert!(
        ["sockmap", "uring", "epoll"].contains(&engine.as_str()),
        "unknown engine {engine}"
    );
    let fwd = log.lines().find(|l| l.contains("listening")).unwrap_or("");
    assert_eq!(field(fwd, "forward"), Some("DB_PORT_6379_TCP"), "{log}");
    assert_eq!(
        field(fwd, "target"),
        Some(format!("{}:6379", ip_of(&db)).as_str()),
        "{log}"
    );
    // No other variable of the link (DB_PORT, DB_PORT_6379_TCP_ADDR, DB_NAME, ...) made a forward.
    assert_eq!(log.matches("listening").count(), 1, "{log}");

    round_trip(&["--link", &format!("{ambc}:db")], "db", "6379", "big", 1);
    let (conns, up) = stats(&ambc, "DB_PORT_6379_TCP");
    assert!(
        conns >= 2,
        "the app's two connections went elsewhere: conns_total={conns}"
    );
    assert!(
        up >= 1 << 20,
        "the 1 MiB SET did not pass the ambassador: bytes_to_upstream={up}"
    );
}

/// Docker ≥ 29 style: no links anywhere. The ambassador gets `-e DB_PORT_6379_TCP=tcp://<db ip>:6379`
/// by hand, the app is given the ambassador's address; the same byte-exact round trip.
#[test]
fn env_without_link() {
    ensure_dockerd();
    let (redis, amb) = (redis_image(), ambassador_image());
    let mut c = Containers::new();
    let db = c.run("amb-e2e-db-", &[redis]);
    let var = format!("DB_PORT_6379_TCP=tcp://{}:6379", ip_of(&db));
    let ambc = c.run("amb-e2e-amb-", &["-e", &var, amb]);
    let log = wait_log(&ambc, "ready forwards=1", READY);
    assert!(
        chosen_engine(&log).is_some(),
        "log does not name the engine:\n{log}"
    );
    round_trip(&[], &ip_of(&ambc), "6379", "big29", 2);
}

/// What the in-kernel engine needs: with Docker's default capabilities (and with NET_ADMIN
/// added) `--mode auto` skips sockmap, says why, and still forwards byte-exact; with
/// `--cap-drop ALL --cap-add SYS_ADMIN` it picks sockmap and forwards byte-exact; `--mode
/// sockmap` without the capability refuses to start (exit 1) rather than degrade.
#[test]
fn sockmap_capabilities() {
    ensure_dockerd();
    let (redis, amb) = (redis_image(), ambassador_image());
    let mut c = Containers::new();
    let db = c.run("amb-e2e-db-", &[redis]);
    let link = format!("{db}:db");

    // Docker's default capability set: no SYS_ADMIN, no NET_ADMIN.
    let plain = c.run("amb-e2e-plain-", &["--link", &link, amb]);
    let log = wait_log(&plain, "ready forwards=1", READY);
    let skip = log
        .lines()
        .find(|l| l.contains("engine skipped") && field(l, "engine") == Some("sockmap"));
    let skip = skip.unwrap_or_else(|| panic!("auto did not say why it skipped sockmap:\n{log}"));
    assert!(
        field(skip, "reason").is_some_and(|r| !r.is_empty()),
        "no reason: {skip}"
    );
    let engine = chosen_engine(&log).unwrap();
    assert_ne!(engine, "sockmap", "{log}");
    eprintln!("without capabilities: {skip}\n  -> engine {engine}");
    round_trip(
        &["--link", &format!("{plain}:db")],
        "db",
        "6379",
        "plain",
        3,
    );

    // NET_ADMIN alone does not make it (bpf(2) needs CAP_SYS_ADMIN here): still skipped.
    let netadmin = c.run(
        "amb-e2e-netadmin-",
        &["--cap-add", "NET_ADMIN", "--link", &link, amb],
    );
    let log = wait_log(&netadmin, "ready forwards=1", READY);
    assert!(
        log.contains("engine skipped engine=sockmap"),
        "with NET_ADMIN only:\n{log}"
    );
    assert_ne!(chosen_engine(&log).as_deref(), Some("sockmap"), "{log}");

    // The minimum found for the in-kernel engine: every capability dropped but SYS_ADMIN
    // (asked for by name, so that a skip would be an error, not a fallback).
    let mut args: Vec<&str> = SOCKMAP_CAPS.to_vec();
    args.extend_from_slice(&["--link", &link, amb, "--mode", "sockmap"]);
    let capped = c.run("amb-e2e-caps-", &args);
    let log = wait_log(&capped, "ready forwards=1", READY);
    assert_eq!(
        chosen_engine(&log).as_deref(),
        Some("sockmap"),
        "with {SOCKMAP_CAPS:?}:\n{log}"
    );
    round_trip(
        &["--link", &format!("{capped}:db")],
        "db",
        "6379",
        "capped",
        4,
    );
    let (_, up) = stats(&capped, "DB_PORT_6379_TCP");
    assert!(up >= 1 << 20, "the 1 MiB SET did not pass: {up} bytes");

    // An explicit request for the engine must fail loudly without the capabilities.
    let (strict, o) = c.try_run(
        "amb-e2e-strict-",
        &["--link", &link, amb, "--mode", "sockmap"],
    );
    assert!(o.status.success(), "docker run: {}", o.stderr);
    let stopped = poll(READY, || {
        let st = docker(&["inspect", "-f", "{{.State.Running}}", &strict]).stdout_str();
        (st.trim() == "false").then_some(())
    });
    assert!(
        stopped.is_some(),
        "--mode sockmap kept running without capabilities:\n{}",
        logs(&strict)
    );
    assert_eq!(
        exit_code(&strict),
        1,
        "contract: a requested engine that cannot start exits 1\n{}",
        logs(&strict)
    );
}
