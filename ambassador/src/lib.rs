//! ambassador: a TCP forwarder for the Docker ambassador pattern.
//!
//! It reads the same link variables as the classic `svendowideit/ambassador`
//! (`DB_PORT_6379_TCP=tcp://10.0.0.2:6379`), serves every forward from one
//! process, and moves the bytes with the best engine the host allows: in the
//! kernel with an eBPF sockmap program, with io_uring, or with epoll.
//!
//! # Layout
//! - [`config`]: the types (forwards, settings); `config::env` reads link
//!   variables, `config::parse` reads flag values.
//! - [`cli`]: the command line and how it becomes [`config::Settings`].
//! - [`server`]: listeners, accept loops, connecting upstream, signals, drain.
//! - [`reload`]: SIGHUP / config-file reload (the diff is pure and tested).
//! - [`engine`]: the contract every engine implements and the start-up choice;
//!   one module per engine (`engine::sockmap`, `engine::uring`, `engine::epoll`).
//! - [`bpf`]: loading the eBPF program and talking to its maps.
//! - [`metrics`]: per-forward counters; [`exporter`] renders them for
//!   Prometheus and [`http`] serves `/metrics`, `/healthz`, `/readyz`.
//! - [`cpus`]: how many CPUs this process may use (`--workers auto`).
//! - [`caps`]: dropping capabilities after start-up.
//! - [`balance`]: choosing a backend and passive health (decisions only);
//!   [`upstream`] does the connecting for it.
//! - [`discovery`]: forwards whose backends are registered in etcd
//!   (`etcd://HOST:PORT/SERVICE`), and `ambassador register`.
//! - [`loops`]: refusing forwards that point at the ambassador itself, at
//!   start-up and at run time.

pub mod balance;
pub mod bpf;
pub mod caps;
pub mod cli;
pub mod config;
pub mod cpus;
pub mod discovery;
pub mod engine;
pub mod exporter;
pub mod http;
pub mod loops;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod upstream;
