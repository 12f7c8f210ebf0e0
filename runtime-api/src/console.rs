//! A guest's console log, capped: past [`CONSOLE_CAP`] bytes the file is
//! rotated (`console.log` becomes `console.log.1`, replacing an older one)
//! and a fresh one begins, so a chatty or hostile guest holds at most
//! twice the cap of the host's disk.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The most one console log file holds.
pub const CONSOLE_CAP: u64 = 1 << 20;

/// A console log that rotates at its cap.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    /// A fresh log at `path` that rotates past `cap` bytes.
    pub fn create(path: &Path, cap: u64) -> std::io::Result<Self> {
        Ok(CappedLog { path: path.to_path_buf(), file: File::create(path)?, written: 0, cap })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(&self.path, PathBuf::from(old))?;
        self.file = File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.cap {
            self.rotate()?;
        }
        // A single write larger than the cap is cut to it.
        let take = buf.len().min(usize::try_from(self.cap).unwrap_or(usize::MAX));
        let n = self.file.write(&buf[..take])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Copies everything each of `sources` gives into one capped log at
/// `path`, a thread each, until end-of-file.
pub fn copy_capped(sources: Vec<Box<dyn std::io::Read + Send>>, path: &Path) -> std::io::Result<()> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(CappedLog::create(path, CONSOLE_CAP)?));
    for mut from in sources {
        let log = log.clone();
        std::thread::Builder::new().name("vessel-console".into()).spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if log.lock().unwrap_or_else(|p| p.into_inner()).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_cap_rotates_and_keeps_at_most_two_caps() {
        let dir = resources::cache::temp_name(&std::env::temp_dir(), "vessel-console");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = CappedLog::create(&path, 100).unwrap();
        for _ in 0..25 {
            log.write_all(b"0123456789").unwrap();
        }
        log.write_all(&[b'x'; 500]).unwrap();
        let current = std::fs::metadata(&path).unwrap().len();
        let older = std::fs::metadata(dir.join("console.log.1")).unwrap().len();
        assert!(current <= 100 && older <= 100, "{current} {older}");
        let entries = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(entries, 2, "more than two files");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
