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
/// `path`, a thread each, until end-of-file. The bytes are the guest's:
/// each thread runs under the console seccomp filter (read, write, the
/// rotation's rename and create). One that cannot install it logs nothing
/// of the guest's and only drains its source, so the writer (QEMU, or the
/// builtin VMM's serial port) never blocks on a full pipe.
pub fn copy_capped(sources: Vec<Box<dyn std::io::Read + Send>>, path: &Path) -> std::io::Result<()> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(CappedLog::create(path, CONSOLE_CAP)?));
    for mut from in sources {
        let log = log.clone();
        std::thread::Builder::new().name("vessel-console".into()).spawn(move || {
            if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Console) {
                tracing::error!(error = %e, "the console copier cannot confine itself; discarding the console");
                let _ = std::io::copy(&mut from, &mut std::io::sink());
                return;
            }
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

/// A pipe's (read, write) ends, close-on-exec.
/// A console a VM's serial port writes into, copied to the capped log at
/// `path` by a copier thread: the pipe's write end. It does not block: a
/// copier that falls a pipe's worth behind costs console bytes (counted
/// lost by the UART), never a stall of the vCPU or the event loop that
/// writes the UART's output out while holding it.
pub(crate) fn guest_console(path: &Path) -> std::io::Result<std::fs::File> {
    let (from_guest, to_log) = pipe()?;
    // SAFETY: fcntl on a descriptor the File owns; no memory is passed.
    if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&to_log), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    copy_capped(vec![Box::new(from_guest)], path)?;
    Ok(to_log)
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array it is given, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just made this fd; the File takes sole ownership of it.
    let read = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    // SAFETY: likewise for the other end.
    let write = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    Ok((read, write))
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

    /// Whether every thread named `name` in this process runs under a
    /// seccomp filter (`Seccomp: 2` in its status), and there is one.
    fn threads_filtered(name: &str) -> std::io::Result<bool> {
        let mut found = false;
        for task in std::fs::read_dir("/proc/self/task")? {
            let dir = task?.path();
            if std::fs::read_to_string(dir.join("comm"))?.trim_end() != name {
                continue;
            }
            found = true;
            let status = std::fs::read_to_string(dir.join("status"))?;
            if !status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])) {
                return Ok(false);
            }
        }
        Ok(found)
    }

    /// Runs in a forked child, whose exit status the test reads: copies
    /// more than a cap through a pipe, so the log rotates on the copier
    /// thread, which must be under its filter.
    fn copy_in_child(dir: &Path) -> i32 {
        let path = dir.join("console.log");
        let (read, mut write) = match pipe() {
            Ok(p) => p,
            Err(_) => return 10,
        };
        if copy_capped(vec![Box::new(read)], &path).is_err() {
            return 11;
        }
        let total = CONSOLE_CAP + CONSOLE_CAP / 2;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..total / chunk.len() as u64 {
            if write.write_all(&chunk).is_err() {
                return 12;
            }
        }
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while size(&path) + size(&dir.join("console.log.1")) < total {
            if std::time::Instant::now() > deadline {
                return 13;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match threads_filtered("vessel-console") {
            Ok(true) => 0,
            Ok(false) => 14,
            Err(_) => 15,
        }
    }

    #[test]
    fn the_copier_rotates_the_log_under_its_seccomp_filter() {
        let dir = resources::cache::temp_name(&std::env::temp_dir(), "vessel-console-filter");
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: glibc's fork resets malloc's locks in the child, which may
        // then allocate and start threads; it leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = copy_in_child(&dir);
            // SAFETY: _exit runs no destructors; the child's work is done.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above, into a local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
        std::fs::remove_dir_all(&dir).unwrap();
        // 159: a seccomp refusal; 14: the copier had no filter.
        assert_eq!(code, 0, "child status {status:#x}");
    }
}
