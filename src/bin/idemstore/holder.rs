//! Which process holds a store file open, for the message of a command refused because of it.
//!
//! redb locks the file it opens; on Linux, a store opened for writing also holds a `flock` on
//! it, which `/proc/locks` lists with the holder's pid. Elsewhere, or when the lock is not
//! listed (byte-range locks of open file descriptions show no pid), the holder is unknown.

use std::path::Path;

/// "pid 1234 (payments)", or "pid unknown".
pub fn describe(path: &Path) -> String {
    match holders(path).first() {
        Some(pid) => match command_name(*pid) {
            Some(name) => format!("pid {pid}: {name}"),
            None => format!("pid {pid}"),
        },
        None => "pid unknown".into(),
    }
}

#[cfg(target_os = "linux")]
fn holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(locks)) = (
        std::fs::metadata(path),
        std::fs::read_to_string("/proc/locks"),
    ) else {
        return Vec::new();
    };
    let dev = meta.dev();
    // The kernel's encoding of a device number (glibc's gnu_dev_major/minor).
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    let wanted = (major, minor, meta.ino());
    let me = std::process::id();
    let mut pids: Vec<u32> = locks
        .lines()
        .filter(|line| !line.contains("->")) // a waiter, not a holder
        .filter_map(|line| {
            // "1: FLOCK  ADVISORY  WRITE 1234 08:02:131074 0 EOF"
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pid: u32 = fields.get(4)?.parse().ok()?;
            let mut id = fields.get(5)?.split(':');
            let major = u64::from_str_radix(id.next()?, 16).ok()?;
            let minor = u64::from_str_radix(id.next()?, 16).ok()?;
            let ino: u64 = id.next()?.parse().ok()?;
            ((major, minor, ino) == wanted && pid != me && pid != 0).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[cfg(not(target_os = "linux"))]
fn holders(_path: &Path) -> Vec<u32> {
    Vec::new()
}

fn command_name(pid: u32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}
