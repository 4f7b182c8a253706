//! Docker for the e2e tests: a running dockerd (installed and started if missing), FROM-scratch
//! images assembled from host files (nothing can be pulled here), containers removed on drop.

use super::{Output, apt_install, ok, poll, run};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Run `docker <args>`; panic unless it exits 0.
pub fn docker(args: &[&str]) -> Output {
    ok(Command::new("docker").args(args), None, T)
}

/// Run `docker <args>` whatever its exit status.
pub fn docker_any(args: &[&str]) -> Output {
    run(Command::new("docker").args(args), None, T)
}

fn daemon_up() -> bool {
    run(
        Command::new("docker").args(["info", "-f", "{{.ServerVersion}}"]),
        None,
        T,
    )
    .status
    .success()
}

/// Make sure a Docker daemon answers: install `docker.io` if dockerd is missing, start
/// `dockerd` (detached with setsid, log in /tmp/dockerd.log) if it is not running, and wait
/// for its socket. The daemon is left running for later tests and users.
pub fn ensure_dockerd() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        if daemon_up() {
            return;
        }
        if !Path::new("/usr/sbin/dockerd").exists() && !Path::new("/usr/bin/dockerd").exists() {
            apt_install(&["docker.io"]);
        }
        // Another process may be starting one right now; only start ours if no socket appears.
        if poll(Duration::from_secs(2), || daemon_up().then_some(())).is_none() {
            let log = std::fs::File::create("/tmp/dockerd.log").expect("create /tmp/dockerd.log");
            let mut dockerd = Command::new("setsid")
                .arg("dockerd")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting dockerd");
            // It outlives the test; reap it should it die while the test runs.
            std::thread::spawn(move || dockerd.wait());
        }
        poll(Duration::from_secs(60), || daemon_up().then_some(()))
            .expect("dockerd did not answer within 60 s; see /tmp/dockerd.log");
    });
}

/// Build a FROM-scratch image `tag` from host executables: each `(host path, image path)`
/// pair is copied (symlinks followed) along with every library `ldd` lists for it, at the
/// same path. `tail` is appended to the Dockerfile (EXPOSE, ENTRYPOINT, ...).
pub fn image_from_host_binaries(tag: &str, bins: &[(&str, &str)], tail: &str) {
    let ctx = std::env::temp_dir().join(super::unique("amb-img-"));
    let _cleanup = RmDir(ctx.clone());
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (host, inside) in bins {
        files.push((host.into(), inside.into()));
        let o = ok(Command::new("ldd").arg(host), None, T);
        for lib in o
            .stdout_str()
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            files.push((lib.into(), lib.into()));
        }
    }
    for (from, to) in &files {
        let dest = ctx.join(to.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // fs::copy follows symlinks (redis-server is a link to redis-check-rdb, and redis picks
        // its personality from argv[0], so the copy keeps the link's name).
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM scratch\nCOPY . /\n{tail}\n"),
    )
    .unwrap();
    ok(
        Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag])
            .arg(&ctx),
        None,
        Duration::from_secs(120),
    );
}

/// The redis image used for both the `db` and the `app` containers: the host's redis-server
/// and redis-cli with their libraries. `docker run IMG` serves on 6379 (EXPOSEd so that
/// `--link` injects `<ALIAS>_PORT_6379_TCP`); `--entrypoint /usr/bin/redis-cli` makes the app.
pub fn redis_image() -> &'static str {
    static TAG: OnceLock<&'static str> = OnceLock::new();
    TAG.get_or_init(|| {
        let tag = "ambassador-e2e-redis:latest";
        apt_install(&["redis-server", "redis-tools"]);
        image_from_host_binaries(
            tag,
            &[
                ("/usr/bin/redis-server", "/usr/bin/redis-server"),
                ("/usr/bin/redis-cli", "/usr/bin/redis-cli"),
            ],
            "EXPOSE 6379\nENTRYPOINT [\"/usr/bin/redis-server\"]\n\
             CMD [\"--protected-mode\", \"no\", \"--save\", \"\", \"--appendonly\", \"no\"]",
        );
        tag
    })
}

/// The ambassador image, built by `cargo xtask image` (the same path users take), from
/// `$AMBASSADOR_STATIC_BIN` if that is set, else from the tree. Returns the tag.
pub fn ambassador_image() -> &'static str {
    static TAG: OnceLock<&'static str> = OnceLock::new();
    TAG.get_or_init(|| {
        let tag = "ambassador-e2e:latest";
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            // The outer `cargo test` holds the lock on target/; the nested build of xtask uses
            // its own directory (the static binary has its own, target/static, anyway).
            .env("CARGO_TARGET_DIR", root.join("target/xtask-nested"))
            .args(["run", "-q", "-p", "xtask", "--", "image", "--tag", tag]);
        if let Some(b) = std::env::var_os("AMBASSADOR_STATIC_BIN").filter(|b| !b.is_empty()) {
            cmd.arg("--binary").arg(b);
        }
        ok(&mut cmd, None, Duration::from_secs(900));
        tag
    })
}

/// Image size in bytes.
pub fn image_size(tag: &str) -> u64 {
    docker(&["image", "inspect", "-f", "{{.Size}}", tag])
        .stdout_str()
        .trim()
        .parse()
        .unwrap()
}

/// Containers started by a test; `docker rm -f` on drop (logs printed first if the test is
/// failing).
pub struct Containers {
    names: Vec<String>,
}

impl Containers {
    pub fn new() -> Self {
        Containers { names: Vec::new() }
    }

    /// `docker run -d --name <unique> <args>`; returns the container name.
    pub fn run(&mut self, prefix: &str, args: &[&str]) -> String {
        let name = super::unique(prefix);
        self.names.push(name.clone());
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        docker(&all);
        name
    }

    /// Like [`Containers::run`] but returns `docker run`'s output whatever its status.
    pub fn try_run(&mut self, prefix: &str, args: &[&str]) -> (String, Output) {
        let name = super::unique(prefix);
        self.names.push(name.clone());
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let o = docker_any(&all);
        (name, o)
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for n in &self.names {
            if std::thread::panicking() {
                let o = docker_any(&["logs", n]);
                eprintln!(
                    "----- docker logs {n} -----\n{}{}-----",
                    o.stdout_str(),
                    o.stderr
                );
            }
            let _ = docker_any(&["rm", "-f", "-v", n]);
        }
    }
}

/// Combined stdout+stderr of a container.
pub fn logs(name: &str) -> String {
    let o = docker(&["logs", name]);
    super::strip_ansi(&format!("{}{}", o.stdout_str(), o.stderr))
}

/// Wait until the container's log contains `pat`; panic with the log if it stops first or
/// the time runs out.
pub fn wait_log(name: &str, pat: &str, timeout: Duration) -> String {
    let found = poll(timeout, || {
        let l = logs(name);
        if l.contains(pat) {
            return Some(Ok(l));
        }
        let running = docker(&["inspect", "-f", "{{.State.Running}}", name]).stdout_str();
        (running.trim() != "true").then_some(Err(l))
    });
    match found {
        Some(Ok(l)) => l,
        Some(Err(l)) => panic!("{name} stopped before logging {pat:?}:\n{l}"),
        None => panic!(
            "{name} did not log {pat:?} within {timeout:?}:\n{}",
            logs(name)
        ),
    }
}

/// A container's address on the default bridge.
pub fn ip_of(name: &str) -> String {
    let ip = docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name]).stdout_str();
    let ip = ip.trim().to_string();
    assert!(!ip.is_empty(), "{name} has no address");
    ip
}

/// Exit code of a stopped container.
pub fn exit_code(name: &str) -> i32 {
    docker(&["inspect", "-f", "{{.State.ExitCode}}", name])
        .stdout_str()
        .trim()
        .parse()
        .unwrap()
}

struct RmDir(PathBuf);

impl Drop for RmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
