//! Helpers shared by the ambassador's integration tests and its test tools, written once:
//!
//! - [`stream`]: a deterministic pseudo-random byte stream, so a sender and a checker can move
//!   and verify gigabytes without storing them;
//! - [`net`]: free loopback ports;
//! - [`wait`]: the one bounded wait on a condition (tests never sleep to synchronise);
//! - [`stats`]: reading the proxy's `stats` log lines (`key=value` fields);
//! - [`h2cut`]: a TCP proxy in front of a gRPC server (etcd) that cuts the connection just
//!   before the client's n-th call, to make a between-two-calls failure certain;
//! - [`pki`]: a CA and the certificates it signs (TLS server on 127.0.0.1, TLS client), made
//!   with `openssl` in a directory of the caller's;
//! - [`netns`]: a private network namespace for the calling thread (loopback only, its own TCP
//!   sysctls), which the kernel removes with the test;
//! - [`seccomp`]: filters that make chosen syscalls fail with EPERM in a child process, the way
//!   Docker's default profile refuses io_uring and bpf, built with the `seccompiler` crate.
//!
//! It is a workspace crate of its own (a dev-dependency of `ambassador`), so that nothing of it
//! ships in the product package.

pub mod h2cut;
pub mod net;
pub mod netns;
pub mod pki;
pub mod seccomp;
pub mod stats;
pub mod stream;
pub mod wait;

pub use net::{free_port, free_ports};
pub use stats::{stat, stats_line};
pub use stream::Stream;
#[cfg(feature = "tokio")]
pub use wait::poll_async;
pub use wait::{TimedOut, poll, until, wait_until};
