//! What a pass produced, as written to `<date>-<pass>.json`: per row, per figure,
//! every round's sample and their median and spread.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A figure: its key in the JSON, its column header, and which way is better.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
}

pub const FIGURES: &[Figure] = &[
    Figure {
        key: "lat64_p50_us",
        label: "64 B p50 µs",
        higher_is_better: false,
    },
    Figure {
        key: "lat64_p99_us",
        label: "64 B p99 µs",
        higher_is_better: false,
    },
    Figure {
        key: "lat64_p999_us",
        label: "64 B p99.9 µs",
        higher_is_better: false,
    },
    Figure {
        key: "lat16k_p50_us",
        label: "16 KiB p50 µs",
        higher_is_better: false,
    },
    Figure {
        key: "lat16k_p99_us",
        label: "16 KiB p99 µs",
        higher_is_better: false,
    },
    Figure {
        key: "lat16k_p999_us",
        label: "16 KiB p99.9 µs",
        higher_is_better: false,
    },
    Figure {
        key: "tput1_gbps",
        label: "1 stream Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "tput8_gbps",
        label: "8 streams Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "conn_per_s",
        label: "conn/s",
        higher_is_better: true,
    },
    Figure {
        key: "syscalls_per_conn",
        label: "syscalls/conn",
        higher_is_better: false,
    },
    Figure {
        key: "cpu_proxy_s_per_gib",
        label: "proxy CPU s/GiB",
        higher_is_better: false,
    },
    Figure {
        key: "cpu_sys_s_per_gib",
        label: "system CPU s/GiB",
        higher_is_better: false,
    },
    Figure {
        key: "rss_mib",
        label: "RSS MiB",
        higher_is_better: false,
    },
    Figure {
        key: "idle_proxy_kib_per_conn",
        label: "idle proxy KiB/conn",
        higher_is_better: false,
    },
    Figure {
        key: "idle_kernel_kib_per_conn",
        label: "idle kernel KiB/conn",
        higher_is_better: false,
    },
];

pub fn figure(key: &str) -> &'static Figure {
    FIGURES.iter().find(|f| f.key == key).expect("known figure")
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Option<Stat> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            samples: samples.to_vec(),
        })
    }
    /// (max - min) / median, as a fraction.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct RowResult {
    pub name: String,
    /// The engine the ambassador reported in its `ready` line (what `auto` chose).
    pub engine: String,
    /// Why the row has no numbers (an engine that cannot start: its own words).
    pub error: Option<String>,
    pub figures: BTreeMap<String, Stat>,
    /// Why a single figure is missing (the tool's own words).
    pub figure_errors: BTreeMap<String, String>,
    /// Idle connections actually held for the idle figures.
    pub idle_conns: usize,
    /// Failed connections counted by wrk (should be 0).
    pub conn_errors: u64,
    /// Workers the ambassador said it runs (`ready` line); 0 for other rows.
    #[serde(default)]
    pub workers: usize,
    /// The biggest syscalls per connection (strace -c), largest first.
    #[serde(default)]
    pub syscall_top: Vec<(String, f64)>,
    #[serde(skip)]
    pub raw: BTreeMap<String, Vec<f64>>,
}

impl RowResult {
    pub fn median(&self, key: &str) -> Option<f64> {
        self.figures.get(key).map(|s| s.median)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct PassResult {
    pub date: String,
    pub started_utc: String,
    /// "same-core" or "cross-core".
    pub pass: String,
    /// "quick", "full" or "smoke".
    pub mode: String,
    pub rounds: u32,
    pub seconds_per_figure: u32,
    pub idle_conns_target: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub proxy_cpu: u32,
    pub client_server_cpu: u32,
    /// CPU lists (taskset -c) of the proxy and of clients + servers: "0", "1", "0,1".
    /// Empty in results written before the two-CPU pass (then `proxy_cpu` says it).
    #[serde(default)]
    pub proxy_cpus: String,
    #[serde(default)]
    pub client_cpus: String,
    /// Figure groups this pass ran (lat, tput, conn, idle); empty = all.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Connections each row's syscall count was taken over; 0 = not measured.
    #[serde(default)]
    pub syscall_conns: usize,
    /// Why a step of this pass did not run (e.g. "syscalls: skipped in smoke mode").
    #[serde(default)]
    pub skipped: Vec<String>,
    pub ambassador_bin: String,
    pub versions: BTreeMap<String, String>,
    /// Machine busy rate (CPU-s/s) measured before each round, from other work.
    pub background_busy: Vec<f64>,
    pub rows: Vec<RowResult>,
}

impl PassResult {
    pub fn row(&self, name: &str) -> Option<&RowResult> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The HAProxy row of this pass (`haproxy`, or `haproxy nbthread 2` in
    /// the two-CPU pass): what the ratios and goals compare with.
    pub fn haproxy(&self) -> Option<&RowResult> {
        self.rows.iter().find(|r| r.name.starts_with("haproxy"))
    }

    /// Did this pass run figure group `g`?
    pub fn ran(&self, g: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|x| x == g)
    }
}

/// The figure group a key belongs to (what `--figures` selects), or
/// "syscalls" for the strace step.
pub fn group_of(key: &str) -> &'static str {
    if key.starts_with("lat") {
        "lat"
    } else if key.starts_with("tput") || key.starts_with("cpu_") {
        "tput"
    } else if key == "conn_per_s" {
        "conn"
    } else if key.starts_with("idle_") {
        "idle"
    } else if key.starts_with("syscalls") {
        "syscalls"
    } else {
        "always"
    }
}
