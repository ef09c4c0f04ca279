//! Resident memory from `/proc`: the peak (VmHWM) of a process, and resetting this process's
//! peak so that each phase of the run reports its own.

use std::fs;

fn status_kib(path: &str, field: &str) -> Option<u64> {
    let status = fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok()
}

/// Peak resident set size of this process, in bytes.
pub fn peak() -> Option<u64> {
    status_kib("/proc/self/status", "VmHWM:").map(|k| k * 1024)
}

/// Peak resident set size of process `pid`, in bytes.
pub fn peak_of(pid: u32) -> Option<u64> {
    status_kib(&format!("/proc/{pid}/status"), "VmHWM:").map(|k| k * 1024)
}

/// Resets this process's peak to its current resident size (Linux 4.0+); returns whether it
/// worked.
pub fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}
