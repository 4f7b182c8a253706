//! The proxy's `stats` lines, read back from its log.
//!
//! On SIGUSR1 and at exit the ambassador logs one line per forward:
//! `... INFO ambassador: stats forward=127.0.0.1:7000 connections_total=3 ... bytes_to_upstream=42`.
//! Tests find the last such line (of one forward, or any) and read a counter from it.

/// The last `stats` line in `log`; of the forward whose source is `forward`, unless it is empty.
pub fn stats_line<'a>(log: &'a str, forward: &str) -> Option<&'a str> {
    let want = format!(" forward={forward} ");
    log.lines()
        .rev()
        .find(|l| l.contains(" stats ") && (forward.is_empty() || l.contains(&want)))
}

/// The number after ` key=` in `line` (digits up to the first non-digit).
pub fn stat(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_of_the_forward() {
        let log = "x INFO a: stats forward=A bytes=1 n=2\n\
                   x INFO a: stats forward=B bytes=5\n\
                   x INFO a: stats forward=A bytes=3\n";
        assert_eq!(stat(stats_line(log, "A").unwrap(), "bytes"), Some(3));
        assert_eq!(stat(stats_line(log, "B").unwrap(), "bytes"), Some(5));
        assert_eq!(stat(stats_line(log, "").unwrap(), "bytes"), Some(3));
        assert_eq!(stat(stats_line(log, "A").unwrap(), "missing"), None);
    }
}
