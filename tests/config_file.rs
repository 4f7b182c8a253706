//! `--config FILE`: a TOML file of forwards (several backends each) and
//! settings, combined with flags and link variables; checked by `--check`,
//! with one-line `FILE:LINE: KEY: …` errors (exit 2); and real redis
//! traffic through a forward that only the file defines.

#[path = "support/redis.rs"]
mod redis;
mod support;

use std::process::Command;
use support::*;

/// A config file in the temp dir, removed when the test is done with it.
struct Written(String);

impl std::ops::Deref for Written {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(name: &str, text: &str) -> Written {
    let file = format!("amb-config-file-{}-{name}", std::process::id());
    let path = std::env::temp_dir().join(file);
    std::fs::write(&path, text).unwrap();
    Written(path.to_string_lossy().into_owned())
}

const FULL: &str = r#"
# Every setting a flag has, and two forwards.
mode = "epoll"
connect_timeout = "2s"
idle_timeout = "5m"
max_conns = 100
drain_timeout = "10s"
nodelay = true
balance = "least-conn"

[health]
fails = 4
backoff = "5s"
backoff_max = "40s"

[[forward]]
name = "redis"
listen = "127.0.0.1:7000"
backends = ["db1:6379", "db2:6379"]
health = { fails = 2 }

[[forward]]
listen = 5432
backends = ["[::1]:5432"]
balance = "round-robin"
"#;

#[test]
fn check_prints_the_file_flags_and_link_variables_together() {
    let path = write("full.toml", FULL);
    let (code, out, err) = run_with_env(
        &[("CACHE_PORT_11211_TCP", "tcp://10.0.0.9:11211")],
        &[
            "--check",
            "--config",
            &path,
            "--forward",
            "7001=10.0.0.3:80",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let has = |needle: &str| assert!(out.contains(needle), "{needle} in\n{out}");
    has(&format!("{path}[redis]"));
    has("127.0.0.1:7000");
    has("db1:6379,db2:6379");
    has(&format!("{path}[0.0.0.0:5432]"));
    has("[::1]:5432");
    has("--forward 7001=10.0.0.3:80");
    has("CACHE_PORT_11211_TCP");
    // The forward's own health over the file's; the file's balance over the default.
    has(&format!(
        "backends {path}[redis]: least-conn over 2; ejected after 2 connect failures for 5s (doubling up to 40s)"
    ));
    has(
        "settings: mode=epoll connect_timeout=2s idle_timeout=300s max_conns=100 drain_timeout=10s nodelay=true",
    );

    // A flag given on the command line wins over the file's setting.
    let (code, out, err) = run_with_env(
        &[],
        &[
            "--check",
            "--config",
            &path,
            "--connect-timeout",
            "3s",
            "--mode",
            "uring",
            "--balance",
            "round-robin",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("settings: mode=uring connect_timeout=3s idle_timeout=300s"),
        "{out}"
    );
    assert!(out.contains("round-robin over 2"), "{out}");
}

/// A bad-input run: exit 2, exactly one line on stderr, returned.
fn error(args: &[&str]) -> String {
    let (code, out, err) = run_with_env(&[], args);
    assert_eq!(code, 2, "stdout={out} stderr={err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err.trim_end().to_string()
}

#[test]
fn errors_name_the_file_the_line_and_the_key() {
    for (text, want) in [
        (
            "connect_timeout = \"2s\"\nidle_timeout = \"soon\"\n",
            ":2: idle_timeout: ",
        ),
        (
            "[[forward]]\nlisten = 7000\nbackends = [\"db:1\", \"db:99999\"]\n",
            ":3: forward[0].backends[1]: ",
        ),
        (
            "[[forward]]\nlisten = 7000\nbackends = [\"db:1\"]\nbalanse = \"x\"\n",
            ":4: balanse: unknown field",
        ),
        ("[health]\nfails = 0\n", ":2: health.fails: "),
        (
            "[[forward]]\nlisten = \"nope:1\"\nbackends = [\"db:1\"]\n",
            ":2: forward[0].listen: ",
        ),
        ("max_conns = [\n", ":1: max_conns: "),
    ] {
        let path = write("bad.toml", text);
        let e = error(&["--check", "--config", &path]);
        assert!(e.contains(&format!("{path}{want}")), "{want} in {e}");
    }
    let e = error(&["--check", "--config", "/nonexistent/amb.toml"]);
    assert!(
        e.contains("--config /nonexistent/amb.toml: cannot read"),
        "{e}"
    );
    // A forward in the file and a flag on the same address.
    let path = write(
        "clash.toml",
        "[[forward]]\nlisten = 7000\nbackends = [\"db:1\"]\n",
    );
    let e = error(&["--check", "--config", &path, "--forward", "7000=db:2"]);
    assert!(e.contains(&format!("{path}[0.0.0.0:7000]")), "{e}");
    assert!(e.contains("--forward 7000=db:2"), "{e}");
    // A file with no forward and nothing else.
    let path = write("empty.toml", "connect_timeout = \"1s\"\n");
    let e = error(&["--check", "--config", &path]);
    assert!(e.contains("has no [[forward]]"), "{e}");
}

#[test]
fn redis_through_a_forward_from_the_file() {
    let (r1, r2) = (redis::Redis::start(), redis::Redis::start());
    let port = free_port();
    let path = write(
        "redis.toml",
        &format!(
            "[[forward]]\nname = \"redis\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\", \"{}\"]\n",
            r1.addr(),
            r2.addr()
        ),
    );
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(["--mode", "epoll", "--config", &path]);
    let p = Proxy::spawn(cmd, port).expect("ready");
    let held: Vec<_> = (0..4)
        .map(|_| {
            let mut c = redis::connect(&p.addr());
            assert_eq!(redis::command(&mut c, &["PING"]), "+PONG");
            c
        })
        .collect();
    assert_eq!(r1.info("clients", "connected_clients"), 3, "{}", p.log());
    assert_eq!(r2.info("clients", "connected_clients"), 3, "{}", p.log());
    assert!(
        p.log()
            .contains(&format!("listening forward={path}[redis]")),
        "{}",
        p.log()
    );
    drop(held);
}
