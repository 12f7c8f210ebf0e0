//! Giving back the pages of vessel's own code that only ran at start.
//!
//! Starting a VM runs code that never runs again (argument parsing, the
//! logger, the VM builder), and the kernel maps each page of it together
//! with its neighbours (fault-around: 64 KiB at a time): a VMM process
//! holds about 3.5 MiB of its binary mapped once the guest runs, of which
//! the running VM needs a fraction. Dropping those mappings
//! (MADV_DONTNEED) once the VM runs brings the process's resident set
//! down to what the VM uses; the pages stay in the page cache, shared with
//! every other vessel process, and what runs later maps them again. The
//! heap's free memory goes back as well.

use std::fs::File;
use std::io::{BufRead, BufReader};

/// Drops this process's mappings of its executable's read-only, never
/// written segments (code, read-only data). Only mappings that are not
/// writable and hold no page of their own are dropped: a segment written
/// at start and made read-only after (RELRO) holds its own pages, which
/// dropping would lose. Best effort: a mapping that cannot be read about
/// or dropped is left as it is.
pub(crate) fn drop_startup_pages() {
    // The heap's free memory at its top, left by start-up's allocations
    // (argument parsing, the VM's set-up), goes back too.
    // SAFETY: malloc_trim only releases memory malloc holds free.
    unsafe { libc::malloc_trim(0) };
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
    let Ok(smaps) = File::open("/proc/self/smaps") else { return };
    let mut current: Option<(usize, usize)> = None;
    for line in BufReader::new(smaps).lines().map_while(Result::ok) {
        if let Some(range) = mapping_of(&line, &exe) {
            current = range;
            continue;
        }
        // "Anonymous:" comes after the mapping's header line: a read-only
        // mapping of the executable with no anonymous page was never
        // written, and its pages can be read again from the file.
        if let (Some((start, end)), Some(kib)) = (current, line.strip_prefix("Anonymous:")) {
            current = None;
            if kib.trim().trim_end_matches("kB").trim() == "0" {
                // SAFETY: [start, end) is a whole mapping of this process's
                // executable, read-only and without private pages (checked
                // above): dropping it loses nothing, and the next access
                // maps the same file pages again.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
            }
        }
    }
}

/// For a mapping's header line in /proc/self/smaps: Some(Some(range)) when
/// it maps `exe` without write permission, Some(None) for any other
/// mapping, None for the other lines.
fn mapping_of(line: &str, exe: &std::path::Path) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let path = fields.nth(3).unwrap_or_default();
    let read_only = perms.starts_with('r') && perms.as_bytes()[1] == b'-' && perms.ends_with('p');
    Some((read_only && std::path::Path::new(path) == exe && end > start).then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn only_read_only_mappings_of_the_executable_are_picked() {
        let exe = Path::new("/usr/bin/vessel");
        let line = |s: &str| mapping_of(s, exe);
        assert_eq!(line("7f00-7f10 r-xp 00001000 fe:00 12 /usr/bin/vessel"), Some(Some((0x7f00, 0x7f10))));
        assert_eq!(line("7f00-7f10 r--p 00000000 fe:00 12 /usr/bin/vessel"), Some(Some((0x7f00, 0x7f10))));
        assert_eq!(line("7f00-7f10 rw-p 00000000 fe:00 12 /usr/bin/vessel"), Some(None));
        assert_eq!(line("7f00-7f10 r-xp 00000000 fe:00 13 /usr/lib/libc.so"), Some(None));
        assert_eq!(line("7f00-7f10 rw-p 00000000 00:00 0"), Some(None));
        assert_eq!(line("Anonymous:             0 kB"), None);
        assert_eq!(line("Rss:                   4 kB"), None);
    }
}
