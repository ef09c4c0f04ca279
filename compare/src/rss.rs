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

/// Resident set size of this process now, in bytes.
pub fn current() -> Option<u64> {
    status_kib("/proc/self/status", "VmRSS:").map(|k| k * 1024)
}

/// The peak RSS of one phase, with the RSS when it began: memory the allocator kept from an
/// earlier phase stays resident and counts in the peak too.
#[derive(Clone, Copy)]
pub struct Peak {
    pub start: Option<u64>,
    pub peak: Option<u64>,
}

/// The start of a phase: resets the peak and notes the current RSS.
pub struct Phase {
    start: Option<u64>,
}

impl Phase {
    pub fn start() -> Phase {
        reset_peak();
        Phase { start: current() }
    }

    pub fn end(&self) -> Peak {
        Peak {
            start: self.start,
            peak: peak(),
        }
    }
}
