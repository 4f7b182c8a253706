//! Reading a whole prefix in pages, all at one revision.
//!
//! One `Range` of the root would be one gRPC reply, and a reply is bounded
//! by the client's decoding limit (tonic's default, 4 MiB; etcd 3.4 itself
//! sends up to 2 GiB, and `--max-request-bytes` only bounds what it
//! *accepts*). 10,000 endpoints of ~100 bytes fit, 50,000 or long keys do
//! not: the read fails and the hub retries it forever. So the read is
//! paged, the way `etcdctl get --prefix` and clientv3's mirror do it:
//!
//! 1. the first page asks for at most [`PAGE`] keys of `[root, end)` at the
//!    latest revision; its header's revision is the read's revision;
//! 2. each next page starts just after the last key seen (`key + "\0"`,
//!    the smallest key greater than it) and asks for *that* revision, so
//!    the pages together are one snapshot even while keys change;
//! 3. a reply with `more == false` is the last page; the watch then starts
//!    at revision + 1 and misses nothing.
//!
//! If etcd compacts the read's revision between two pages, the next page
//! fails ("required revision has been compacted"): the hub reads again
//! from the start, like a compacted watch. This file decides the requests
//! and collects the pages; `discovery/hub.rs` sends them.

use etcdv3client::pb;

/// Keys per page: ~100 KB of endpoints, far below the 4 MiB reply limit
/// unless keys and values average over 4 KB each.
pub const PAGE: i64 = 1000;

/// A read of every key in `[key, end)` in progress.
#[derive(Debug)]
pub struct Pages {
    /// Where the next page starts.
    next: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    /// 0 until the first reply: then every page asks for this one.
    revision: i64,
    kvs: Vec<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

/// Why a reply cannot be the next page.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// No header revision: nothing to pin the next pages or the watch to.
    NoRevision,
    /// `more`, but no key, or a key not after the last: paging would loop.
    NoProgress,
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bad::NoRevision => "etcd's reply has no revision",
            Bad::NoProgress => "etcd's reply says more keys follow but gives no new key",
        })
    }
}

impl Pages {
    /// Every key starting with `prefix`, [`PAGE`] keys at a time.
    pub fn prefix(prefix: &str) -> Pages {
        Pages::with_limit(prefix, PAGE)
    }

    /// As [`Pages::prefix`], `limit` keys a page.
    pub fn with_limit(prefix: &str, limit: i64) -> Pages {
        Pages {
            next: prefix.as_bytes().to_vec(),
            end: prefix_end(prefix.as_bytes()),
            limit,
            revision: 0,
            kvs: Vec::new(),
            done: false,
        }
    }

    /// The next page to ask for, or `None`: the read is complete.
    pub fn request(&self) -> Option<pb::RangeRequest> {
        (!self.done).then(|| pb::RangeRequest {
            key: self.next.clone(),
            range_end: self.end.clone(),
            limit: self.limit,
            revision: self.revision,
            ..Default::default()
        })
    }

    /// Take the reply to [`Pages::request`].
    pub fn take(&mut self, resp: pb::RangeResponse) -> Result<(), Bad> {
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        if revision <= 0 {
            return Err(Bad::NoRevision);
        }
        if self.revision == 0 {
            self.revision = revision;
        }
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        self.kvs
            .extend(resp.kvs.into_iter().map(|kv| (kv.key, kv.value)));
        if !resp.more {
            self.done = true;
            return Ok(());
        }
        match last {
            Some(mut k) if k >= self.next => {
                k.push(0);
                self.next = k;
                Ok(())
            }
            _ => Err(Bad::NoProgress),
        }
    }

    /// The revision every page was read at (0 before the first reply).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Pages so far collected, in key order.
    pub fn into_kvs(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.kvs
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with
/// its last byte below 0xff raised by one (`/a/` → `/a0`). An all-0xff
/// prefix has no such key: `\0` means "to the end of the key space".
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(b) = end.pop() {
        if b < 0xff {
            end.push(b + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(revision: i64, keys: &[&str], more: bool) -> pb::RangeResponse {
        pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                revision,
                ..Default::default()
            }),
            kvs: keys
                .iter()
                .map(|k| pb::KeyValue {
                    key: k.as_bytes().to_vec(),
                    value: format!("v{k}").into_bytes(),
                    ..Default::default()
                })
                .collect(),
            more,
            count: 0,
        }
    }

    #[test]
    fn the_range_of_a_prefix() {
        assert_eq!(
            prefix_end(b"/ambassador/services/"),
            b"/ambassador/services0"
        );
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn pages_continue_after_the_last_key_at_the_first_revision() {
        let mut p = Pages::with_limit("/s/", 2);
        let first = p.request().unwrap();
        assert_eq!(
            (first.key.as_slice(), first.range_end.as_slice()),
            (&b"/s/"[..], &b"/s0"[..])
        );
        assert_eq!(
            (first.limit, first.revision),
            (2, 0),
            "latest revision first"
        );

        p.take(reply(7, &["/s/a", "/s/b"], true)).unwrap();
        let second = p.request().unwrap();
        assert_eq!(second.key, b"/s/b\0", "just after the last key");
        assert_eq!(second.range_end, b"/s0");
        assert_eq!(second.revision, 7, "the first reply's revision");

        // A later header revision (etcd moved on) does not move the read.
        p.take(reply(9, &["/s/c"], false)).unwrap();
        assert!(p.request().is_none(), "the last page");
        assert_eq!(p.revision(), 7);
        let keys: Vec<_> = p.into_kvs().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [&b"/s/a"[..], b"/s/b", b"/s/c"]);
    }

    #[test]
    fn an_empty_prefix_is_one_page() {
        let mut p = Pages::prefix("/s/");
        assert_eq!(p.request().unwrap().limit, PAGE);
        p.take(reply(3, &[], false)).unwrap();
        assert!(p.request().is_none());
        assert_eq!(p.revision(), 3);
        assert!(p.into_kvs().is_empty());
    }

    #[test]
    fn a_reply_that_cannot_be_paged_on_is_refused() {
        let mut p = Pages::with_limit("/s/", 2);
        assert_eq!(p.take(reply(0, &["/s/a"], false)), Err(Bad::NoRevision));
        let mut p = Pages::with_limit("/s/", 2);
        assert_eq!(p.take(reply(4, &[], true)), Err(Bad::NoProgress));
        let mut p = Pages::with_limit("/s/", 2);
        p.take(reply(4, &["/s/b"], true)).unwrap();
        assert_eq!(
            p.take(reply(4, &["/s/a"], true)),
            Err(Bad::NoProgress),
            "a key behind"
        );
    }
}
