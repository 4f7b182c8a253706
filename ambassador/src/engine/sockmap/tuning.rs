//! The engine's `AMBASSADOR_SOCKMAP_*` overrides, read once. They are for
//! operators and tests, not everyday configuration; a value that is present
//! but not a number is bad input like any flag (the binary checks them at
//! start-up, before an engine is chosen: one line naming the variable,
//! exit 2), never a silent default.
//!
//! - `AMBASSADOR_SOCKMAP_CONNS`: connections the maps hold.
//! - `AMBASSADOR_SOCKMAP_INFLIGHT`: the in-flight cap per half, bytes.
//! - `AMBASSADOR_SOCKMAP_BACKSTOP`: the program's rolling budget, bytes
//!   (`budget.rs`); must exceed the in-flight cap.
//! - `AMBASSADOR_SOCKMAP_PROMOTE_TURNS`: `--splice adaptive`'s turns.

use super::{BACKSTOP, DEFAULT_CAPACITY, INFLIGHT_CAP, PROMOTE};
use crate::engine::epoll::Promote;

/// The values in force, defaults where no variable is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub capacity: u32,
    pub inflight: u64,
    pub backstop: u64,
    pub promote: Promote,
}

impl Tuning {
    /// Read the variables from the process environment.
    pub fn from_env() -> Result<Tuning, String> {
        Tuning::from_lookup(|k| std::env::var(k))
    }

    /// Read the variables through `get` (for tests: no process env).
    pub fn from_lookup(
        get: impl Fn(&str) -> Result<String, std::env::VarError>,
    ) -> Result<Tuning, String> {
        let num = |k: &str| -> Result<Option<u64>, String> {
            match get(k) {
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(_) => Err(format!("{k}: not valid UTF-8")),
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{k}={v:?}: not a number")),
            }
        };
        let capacity = match num("AMBASSADOR_SOCKMAP_CONNS")? {
            None => DEFAULT_CAPACITY,
            Some(c) => u32::try_from(c).ok().filter(|&c| c > 0).ok_or(format!(
                "AMBASSADOR_SOCKMAP_CONNS={c}: not in 1..=4294967295"
            ))?,
        };
        let inflight = num("AMBASSADOR_SOCKMAP_INFLIGHT")?.unwrap_or(INFLIGHT_CAP);
        let backstop = num("AMBASSADOR_SOCKMAP_BACKSTOP")?.unwrap_or(BACKSTOP);
        if backstop <= inflight {
            return Err(format!(
                "AMBASSADOR_SOCKMAP_BACKSTOP={backstop}: must exceed the in-flight cap ({inflight})"
            ));
        }
        let mut promote = PROMOTE;
        if let Some(t) = num("AMBASSADOR_SOCKMAP_PROMOTE_TURNS")? {
            promote.turns = u32::try_from(t)
                .map_err(|_| format!("AMBASSADOR_SOCKMAP_PROMOTE_TURNS={t}: too large"))?;
        }
        Ok(Tuning {
            capacity,
            inflight,
            backstop,
            promote,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::env::VarError;

    fn with(vars: &[(&str, &str)]) -> Result<Tuning, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tuning::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .ok_or(VarError::NotPresent)
        })
    }

    #[test]
    fn defaults_without_variables() {
        let t = with(&[]).unwrap();
        assert_eq!(
            (t.capacity, t.inflight, t.backstop, t.promote),
            (DEFAULT_CAPACITY, INFLIGHT_CAP, BACKSTOP, PROMOTE)
        );
    }

    #[test]
    fn overrides_are_read() {
        let t = with(&[
            ("AMBASSADOR_SOCKMAP_CONNS", "7"),
            ("AMBASSADOR_SOCKMAP_INFLIGHT", "1000"),
            ("AMBASSADOR_SOCKMAP_BACKSTOP", " 5000 "),
            ("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "0"),
        ])
        .unwrap();
        assert_eq!((t.capacity, t.inflight, t.backstop), (7, 1000, 5000));
        assert_eq!(t.promote.turns, 0);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("AMBASSADOR_SOCKMAP_CONNS", "lots"),
            ("AMBASSADOR_SOCKMAP_CONNS", "0"),
            ("AMBASSADOR_SOCKMAP_CONNS", "99999999999"),
            ("AMBASSADOR_SOCKMAP_INFLIGHT", "-1"),
            ("AMBASSADOR_SOCKMAP_BACKSTOP", "4k"),
            ("AMBASSADOR_SOCKMAP_BACKSTOP", "4194304"),
            ("AMBASSADOR_SOCKMAP_PROMOTE_TURNS", "99999999999"),
        ] {
            let e = with(&[(k, v)]).unwrap_err();
            assert!(e.starts_with(&format!("{k}=")), "{k}={v}: {e}");
        }
    }
}
