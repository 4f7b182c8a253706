//! The layout shared by the kernel program (`ambassador-ebpf`) and the loader
//! (`ambassador::bpf`): map names, key and value types. Defined once, here.
//!
//! Every map is keyed by a socket cookie (`SO_COOKIE` in userspace,
//! `bpf_get_socket_cookie(skb)` in the kernel). Cookies are never reused while
//! the system runs, so a stale entry can never steer a new connection's bytes.
//!
//! Per spliced socket ("source" = the socket whose ingress the verdict sees):
//! - `PEERS[src]`   = the destination socket (SOCKHASH, no program attached)
//! - `VERDICT[src]` = the socket itself (SOCKHASH, verdict program attached)
//! - `STATS[src]`   = [`DirStats`], written only by the program
//! - `CTRL[src]`    = [`DirCtrl`], written only by userspace
//! - `EVENTS`       = ring buffer of cookies that need userspace now
//!   (a direction started passing, or a resting one moved again)
//!
//! Splitting the counters (kernel-written) from the controls (user-written)
//! keeps each map single-writer: the verdict for one socket always runs under
//! that socket's lock, so its plain `+=` never races with itself, and a
//! userspace update of `CTRL` can never clobber a kernel counter.
#![no_std]

/// SOCKHASH: source cookie -> destination socket. Filled first; no program.
pub const MAP_PEERS: &str = "PEERS";
/// SOCKHASH: own cookie -> own socket. The verdict program is attached here,
/// so a socket only gets verdicts once it is inserted here (after `PEERS`).
pub const MAP_VERDICT: &str = "VERDICT";
/// HASH: source cookie -> [`DirStats`].
pub const MAP_STATS: &str = "STATS";
/// HASH: source cookie -> [`DirCtrl`].
pub const MAP_CTRL: &str = "CTRL";
/// RINGBUF: the source cookie (u64), pushed when a direction switches from
/// redirecting to passing, or when its redirected count crosses
/// `DirCtrl::wake`, so userspace wakes up at once (no polling).
pub const MAP_EVENTS: &str = "EVENTS";
/// Size of `EVENTS` in bytes (a record is 16 bytes: 8 header + 8 cookie).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// The program's read-only global (`u8`): 1 = cut overlapping skbs.
pub const GLOBAL_TRIM: &str = "TRIM";
/// The verdict program's name in the object.
pub const PROG_VERDICT: &str = "verdict";

/// Default capacity of every map, in sockets (two per spliced connection).
/// The loader may override it with `EbpfLoader::set_max_entries`.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// Counters for one direction (source socket -> its peer), kernel-written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Payload bytes redirected to the peer's send path.
    pub redirected_bytes: u64,
    /// skbs redirected.
    pub redirected_segs: u64,
    /// Payload bytes left on the source socket (`SK_PASS`) because the
    /// budget in `DirCtrl` ran out. The engine keeps that budget as a far
    /// backstop and never copies passed bytes (reading a socket that is in a
    /// sockmap is unsafe, see docs/sockmap.md): any passed byte makes its
    /// integrity check reset the connection.
    pub passed_bytes: u64,
    /// skbs whose redirect failed (no peer entry). The program drops them
    /// (`SK_DROP`) after TCP acknowledged them: those bytes are lost, and
    /// the engine's integrity check resets the connection.
    pub misses: u64,
    /// Zero-length skbs (a FIN) dropped rather than redirected.
    pub zero_len: u64,
    /// Bytes cut from the head of skbs that overlapped bytes this socket
    /// had already handed on (a partly old retransmission that TCP queued
    /// whole; `tcp_read_skb` does not skip the overlap). See
    /// docs/sockmap.md, "Overlapping skbs".
    pub trimmed_bytes: u64,
    /// skbs that were cut.
    pub trimmed_segs: u64,
    /// skbs whose sequence numbers did not follow the previous one (a gap,
    /// an overlap larger than the cut can take, or an skb entirely old).
    /// The program drops such an skb (none of its bytes reach the peer);
    /// the engine treats any anomaly as a broken stream and resets the
    /// connection.
    pub seq_anomalies: u64,
    /// `TCP_SKB_CB(skb)->end_seq` of the last skb seen: where the next one
    /// must start. Meaningful while `seq_state == SEQ_TRACKING`; once
    /// `SEQ_UNAVAILABLE` because an skb's length did not match its sequence
    /// span, that length minus the span.
    pub next_seq: u32,
    /// [`SEQ_UNKNOWN`], [`SEQ_TRACKING`] or [`SEQ_UNAVAILABLE`].
    pub seq_state: u32,
}

/// `DirStats::seq_state`: no skb seen yet (the first one sets `next_seq`).
pub const SEQ_UNKNOWN: u32 = 0;
/// `DirStats::seq_state`: `next_seq` is valid; overlaps are cut.
pub const SEQ_TRACKING: u32 = 1;
/// `DirStats::seq_state`: an skb's sequence numbers could not be read or did
/// not match its length (another kernel layout, or trimming disabled):
/// nothing is cut on this socket; the conservation check still holds.
pub const SEQ_UNAVAILABLE: u32 = 2;

/// Controls for one direction, written by userspace, read by the program.
///
/// The program redirects an skb of `len` bytes only while
/// `passed_bytes == forwarded && redirected_bytes + len <= limit`.
/// Otherwise it returns `SK_PASS` (the bytes stay on the source socket,
/// charged to its receive buffer) and the first time pushes the cookie to
/// `EVENTS`. The engine keeps `limit` as a rolling backstop far above its
/// own in-flight cap (the bytes the destination took plus 2 GiB, see
/// `engine/sockmap/budget.rs`) and leaves `forwarded` at 0: it takes a
/// connection out of the kernel long before the program would pass.
///
/// `wake` lets an idle connection stop polling: the redirect that carries
/// `redirected_bytes` past `wake` (from `<= wake` to `> wake`) pushes the
/// cookie to `EVENTS`, once. The engine sets it to the count it last saw
/// when it lets a connection rest, and to [`WAKE_NEVER`] otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCtrl {
    /// Redirect while `redirected_bytes + len <= limit`.
    pub limit: u64,
    /// Passed bytes userspace has read and completely written to the peer.
    pub forwarded: u64,
    /// Push the cookie to `EVENTS` when `redirected_bytes` crosses this.
    pub wake: u64,
}

/// `DirCtrl::wake` that never fires (no count exceeds it).
pub const WAKE_NEVER: u64 = u64::MAX;

#[cfg(feature = "user")]
mod pod {
    // Safety: both types are `#[repr(C)]`, made only of `u64`s (no padding,
    // every bit pattern valid), which is what `aya::Pod` requires.
    unsafe impl aya::Pod for super::DirStats {}
    unsafe impl aya::Pod for super::DirCtrl {}
}
