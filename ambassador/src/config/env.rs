//! Docker link variables → forwards, with the classic ambassador's meaning.
//!
//! `docker run --link db:db` injects, for each port the linked container
//! exposes, `DB_PORT_6379_TCP=tcp://172.17.0.2:6379` plus companions
//! (`…_ADDR`, `…_PORT`, `…_PROTO`, `DB_PORT`, `DB_NAME`, range `…_START` /
//! `…_END`) and the linked container's own variables as `DB_ENV_<VAR>`.
//! The classic `svendowideit/ambassador` turned every line matching `_TCP=`
//! into `socat TCP4-LISTEN:<n> TCP4:<host>:<port>`: it listens on the `<n>`
//! from the variable *name* and connects to the address in the *value*
//! (`-e REDIS_PORT_1234_TCP=tcp://192.168.1.52:6379` listens on 1234).
//!
//! We keep that meaning and drop its traps: only a name of the exact shape
//! `<ALIAS>_PORT_<n>_<PROTO>` counts, so companions never create forwards; a
//! linked container's own `<ALIAS>_ENV_…` variables are skipped (they would
//! be forwards the user never asked for); UDP and SCTP are reported as
//! skipped, never silently dropped; a malformed value is an error naming the
//! variable. Duplicate listen ports are caught later, across all sources.
//!
//! The environment is bytes, not text: [`scan_os`] takes it as the OS gives
//! it, and a would-be link variable whose name or value is not UTF-8 is
//! reported as skipped (named lossily), never dropped without a word.

use super::{Forward, Proto, parse};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};

/// A variable that looked like a link variable but creates no forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub var: String,
    pub why: &'static str,
}

/// Forwards and skipped variables found in an environment.
#[derive(Debug, Default)]
pub struct Scan {
    pub forwards: Vec<Forward>,
    pub skipped: Vec<Skipped>,
}

/// What the error says was looked for when nothing was found.
pub const LOOKED_FOR: &str =
    "<ALIAS>_PORT_<n>_TCP=tcp://<host>:<port> variables (as set by `docker run --link`)";

/// `ALIAS_PORT_<n>_<PROTO>` → (alias, n, proto), or None for any other name.
fn split_name(name: &str) -> Option<(&str, &str, &str)> {
    let (rest, proto) = name.rsplit_once('_')?;
    if !matches!(proto, "TCP" | "UDP" | "SCTP") {
        return None;
    }
    let (alias, n) = rest.rsplit_once("_PORT_")?;
    if alias.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((alias, n, proto))
}

/// [`scan`] over the raw environment, e.g. `std::env::vars_os()`. Variables
/// that are not UTF-8 cannot be read; those that look like link variables
/// (judged on the lossily decoded name) are reported as skipped, the rest
/// (some unrelated `LANG=…`) are ignored like any other unrelated variable.
pub fn scan_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Scan, String> {
    let mut text = Vec::new();
    let mut unreadable = Vec::new();
    for (name, value) in vars {
        match (name.into_string(), value.into_string()) {
            (Ok(n), Ok(v)) => text.push((n, v)),
            (name, _) => {
                let (lossy, why) = match name {
                    Ok(n) => (n, "value is not valid UTF-8"),
                    Err(n) => (n.to_string_lossy().into_owned(), "name is not valid UTF-8"),
                };
                if split_name(&lossy).is_some() {
                    unreadable.push(Skipped { var: lossy, why });
                }
            }
        }
    }
    let mut out = scan(text)?;
    out.skipped.extend(unreadable);
    out.skipped.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(out)
}

/// Read link variables from `vars` (name, value) pairs, e.g. `std::env::vars()`.
pub fn scan(vars: impl IntoIterator<Item = (String, String)>) -> Result<Scan, String> {
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    vars.sort();
    let mut out = Scan::default();
    for (name, value) in vars {
        let Some((alias, n, proto)) = split_name(&name) else {
            continue;
        };
        if alias.contains("_ENV_") {
            out.skipped.push(Skipped {
                var: name,
                why: "a linked container's own environment variable (<ALIAS>_ENV_…), not a link",
            });
            continue;
        }
        if proto != "TCP" {
            out.skipped.push(Skipped {
                var: name,
                why: "only TCP is forwarded (UDP/SCTP not supported yet)",
            });
            continue;
        }
        let listen_port = parse::port(n).map_err(|e| format!("{name}: {e}"))?;
        let addr = value
            .strip_prefix("tcp://")
            .ok_or_else(|| format!("{name}: value {value:?} is not tcp://HOST:PORT"))?;
        let target = parse::target(addr).map_err(|e| format!("{name}: {e}"))?;
        out.forwards.push(Forward {
            source: name,
            listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), listen_port),
            target: target.into(),
            proto: Proto::Tcp,
            pool: Default::default(),
            discovery: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn classic_link_with_companions() {
        let s = scan(vars(&[
            ("DB_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("DB_PORT_6379_TCP_ADDR", "172.17.0.2"),
            ("DB_PORT_6379_TCP_PORT", "6379"),
            ("DB_PORT_6379_TCP_PROTO", "tcp"),
            ("DB_PORT", "tcp://172.17.0.2:6379"),
            ("DB_NAME", "/amb/db"),
            ("DB_ENV_REDIS_VERSION", "7"),
            ("DB_ENV_X_PORT_5432_TCP", "tcp://1.2.3.4:5432"),
            ("DB_PORT_53_UDP", "udp://172.17.0.2:53"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(s.forwards.len(), 1);
        assert_eq!(s.forwards[0].listen.to_string(), "0.0.0.0:6379");
        assert_eq!(s.forwards[0].target.to_string(), "172.17.0.2:6379");
        let skipped: Vec<&str> = s.skipped.iter().map(|k| k.var.as_str()).collect();
        assert_eq!(skipped, ["DB_ENV_X_PORT_5432_TCP", "DB_PORT_53_UDP"]);
    }

    #[test]
    fn listen_port_comes_from_the_name() {
        let s = scan(vars(&[("REDIS_PORT_1234_TCP", "tcp://192.168.1.52:6379")])).unwrap();
        assert_eq!(s.forwards[0].listen.port(), 1234);
        assert_eq!(s.forwards[0].target.0[0].port, 6379);
    }

    #[test]
    fn non_utf8_link_variables_are_skipped_by_name() {
        use std::os::unix::ffi::OsStringExt;
        let s = scan_os([
            (
                OsString::from("DB_PORT_7000_TCP"),
                OsString::from_vec(b"tcp://\xff:1".to_vec()),
            ),
            (
                OsString::from_vec(b"D\xffB_PORT_7001_TCP".to_vec()),
                OsString::from("tcp://1.2.3.4:1"),
            ),
            (OsString::from("LANG"), OsString::from_vec(vec![0xff])),
        ])
        .unwrap();
        assert!(s.forwards.is_empty());
        let got: Vec<(&str, &str)> = s.skipped.iter().map(|k| (k.var.as_str(), k.why)).collect();
        assert_eq!(
            got,
            [
                ("DB_PORT_7000_TCP", "value is not valid UTF-8"),
                ("D\u{fffd}B_PORT_7001_TCP", "name is not valid UTF-8"),
            ]
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let e = scan(vars(&[("DB_PORT_6379_TCP", "6379")])).unwrap_err();
        assert!(e.starts_with("DB_PORT_6379_TCP: "), "{e}");
        let e = scan(vars(&[("DB_PORT_70000_TCP", "tcp://1.2.3.4:1")])).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}
