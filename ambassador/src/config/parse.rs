//! Parsers for the small values users write: `HOST:PORT` targets,
//! `[LISTEN_ADDR:]PORT=HOST:PORT` forwards, ports and durations.
//!
//! Each returns a short lowercase message on failure; the caller adds the
//! name of the variable or flag, so the user sees one line that says both
//! *where* and *what*.

use super::{Backends, Host, Target, Workers};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A TCP port: 1..=65535. Port 0 ("any port") makes no sense for a forward.
pub fn port(s: &str) -> Result<u16, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("port {s:?} is not a number"))?;
    if n == 0 || n > 65535 {
        return Err(format!("port {n} is out of range 1-65535"));
    }
    Ok(n as u16)
}

/// Split `HOST:PORT`, where HOST may be a bracketed IPv6 literal.
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']' after IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("{s:?}: expected ':PORT' after ']'"))?;
        return Ok((host, port));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:PORT"))?;
    if host.contains(':') {
        return Err(format!(
            "{s:?}: IPv6 addresses must be in brackets, like [::1]:6379"
        ));
    }
    Ok((host, port))
}

/// A hostname per RFC 1123 (letters, digits, '-', '.', '_' for Docker names).
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        })
}

/// `HOST:PORT` → [`Target`]. HOST is an IPv4 address, a bracketed IPv6
/// address, or a hostname (resolved per connection).
pub fn target(s: &str) -> Result<Target, String> {
    let (host, p) = split_host_port(s)?;
    let port = port(p)?;
    let host = if let Ok(ip) = host.parse::<IpAddr>() {
        Host::Ip(ip)
    } else if s.starts_with('[') {
        return Err(format!("{host:?} is not an IPv6 address"));
    } else if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // Looks like an IPv4 address but isn't one (e.g. 300.1.1.1):
        // never send that to DNS as a name.
        return Err(format!("{host:?} is not a valid IPv4 address"));
    } else if valid_hostname(host) {
        Host::Name(host.to_string())
    } else {
        return Err(format!("{host:?} is not a valid host name or address"));
    };
    Ok(Target { host, port })
}

/// `HOST:PORT[,HOST:PORT…]` → [`Backends`]: one or more targets, each listed once.
pub fn backends(s: &str) -> Result<Backends, String> {
    let mut out: Vec<Target> = Vec::new();
    for part in s.split(',') {
        let t = target(part.trim())?;
        if out.contains(&t) {
            return Err(format!("backend {t} is listed twice"));
        }
        out.push(t);
    }
    Ok(Backends(out))
}

/// `--forward [LISTEN_ADDR:]PORT=HOST:PORT[,HOST:PORT…]` → (listen address,
/// backends). Without LISTEN_ADDR the forward listens on all IPv4
/// addresses, like the classic image.
pub fn forward(s: &str) -> Result<(SocketAddr, Backends), String> {
    let (l, tgt) = split_forward(s)?;
    Ok((listen(l)?, backends(tgt)?))
}

/// `LISTEN=TARGET` → its two sides.
pub fn split_forward(s: &str) -> Result<(&str, &str), String> {
    s.split_once('=')
        .ok_or_else(|| format!("{s:?}: expected [LISTEN_ADDR:]PORT=HOST:PORT"))
}

/// The listen side of a forward: `[LISTEN_ADDR:]PORT`.
pub fn listen(listen: &str) -> Result<SocketAddr, String> {
    Ok(if listen.contains(':') {
        let (h, p) = split_host_port(listen)?;
        let ip: IpAddr = h
            .parse()
            .map_err(|_| format!("listen address {h:?} is not an IP address"))?;
        SocketAddr::new(ip, port(p)?)
    } else {
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port(listen)?)
    })
}

/// The longest duration any flag accepts. Anything longer is a typo (and
/// would overflow the clock arithmetic of a timer).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `--workers`: `auto` or a count from 1 to [`MAX_WORKERS`].
pub fn workers(s: &str) -> Result<Workers, String> {
    if s == "auto" {
        return Ok(Workers::Auto);
    }
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is neither a number nor auto"))?;
    if n == 0 || n > MAX_WORKERS {
        return Err(format!("{n} is out of range 1-{MAX_WORKERS}"));
    }
    Ok(Workers::Count(n))
}

/// The most worker threads `--workers` accepts.
pub const MAX_WORKERS: usize = 1024;

/// A duration: a bare number of seconds (`5`), or anything the `humantime`
/// crate reads (`250ms`, `5s`, `2m`, `1h`, `1h 30m`). At most
/// [`MAX_DURATION`]; whether zero is allowed is the caller's decision.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let parsed = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| humantime::DurationError::NumberOverflow)
    } else {
        humantime::parse_duration(s)
    };
    match parsed {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        Ok(_) | Err(humantime::DurationError::NumberOverflow) => {
            Err(format!("{s:?} is too long (at most 365d)"))
        }
        Err(_) => Err(format!("{s:?} is not a duration (like 5s, 250ms, 2m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target("10.0.0.2:6379").unwrap().to_string(),
            "10.0.0.2:6379"
        );
        assert_eq!(target("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(target("db:5432").unwrap().host, Host::Name("db".into()));
        assert!(target("::1:80").unwrap_err().contains("brackets"));
        assert!(target("300.1.1.1:80").unwrap_err().contains("IPv4"));
        assert!(target("db:0").unwrap_err().contains("out of range"));
        assert!(target("db:65536").unwrap_err().contains("out of range"));
        assert!(target("db").unwrap_err().contains("HOST:PORT"));
        assert!(target("d b:1").is_err());
    }

    #[test]
    fn forwards() {
        let (l, t) = forward("7000=db:6379").unwrap();
        assert_eq!(l.to_string(), "0.0.0.0:7000");
        assert_eq!(t.to_string(), "db:6379");
        let (l, _) = forward("[::1]:7000=[::1]:6379").unwrap();
        assert_eq!(l.to_string(), "[::1]:7000");
        assert!(forward("7000").is_err());
        assert!(forward("localhost:7000=db:1").is_err());
        let (_, b) = forward("6379=db1:6379,db2:6379").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.to_string(), "db1:6379,db2:6379");
        assert!(forward("6379=db1:6379,").is_err());
        assert!(
            forward("6379=db1:6379,db1:6379")
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn worker_counts() {
        assert_eq!(workers("auto"), Ok(Workers::Auto));
        assert_eq!(workers("2"), Ok(Workers::Count(2)));
        assert!(workers("0").unwrap_err().contains("out of range"));
        assert!(workers("many").unwrap_err().contains("neither"));
        assert!(workers("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(duration("0").unwrap(), Duration::ZERO);
        assert!(duration("5 parsecs").is_err());
        assert!(duration("").is_err());
        assert!(duration("-5s").is_err());
        assert!(
            duration("99999999999999999999999h")
                .unwrap_err()
                .contains("too long")
        );
        assert!(
            duration("99999999999999999999999")
                .unwrap_err()
                .contains("too long")
        );
        assert!(duration("366d").unwrap_err().contains("too long"));
        assert!(duration("365d").is_ok());
    }
}
