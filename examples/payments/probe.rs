//! What the service process holds, read from Linux's `/proc`: resident memory and open file
//! descriptors.

use std::path::Path;

/// Directory entries counted at most when counting file descriptors (far above any real count).
const FDS_COUNTED_MAX: usize = 1 << 20;

/// One look at a process.
#[derive(Clone, Copy, Default)]
pub struct Sample {
    /// Resident memory now (`VmRSS`), in KiB.
    pub rss_kib: u64,
    /// The most resident memory the process has had (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub fds: u64,
    /// Threads (`Threads`).
    pub threads: u64,
}

/// Samples process `pid`; `None` if it is gone (or this is not Linux).
pub fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    };
    let rss_kib = field("VmRSS:")?;
    let peak_rss_kib = field("VmHWM:")?;
    let threads = field("Threads:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .take(FDS_COUNTED_MAX)
        .count() as u64;
    Some(Sample {
        rss_kib,
        peak_rss_kib,
        fds,
        threads,
    })
}

/// The total size of the regular files directly in `dir`, in bytes (the service's data).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .take(FDS_COUNTED_MAX)
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|meta| meta.is_file())
        .map(|meta| meta.len())
        .sum()
}

/// The load average over the last minute, from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
