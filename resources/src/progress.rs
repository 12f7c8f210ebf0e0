//! Progress on stderr for long steps: a bar for the kernel package
//! download, elapsed time for steps of unknown length (packing a root).
//!
//! On a terminal it redraws one line in place (`\r`); otherwise (a log, a
//! CI run) it prints a line at each quarter, so that logs stay short.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const WIDTH: usize = 30;

/// One line of the bar: `label [=====>      ] 12.3/27.0 MiB 45%`.
pub fn render(label: &str, done: u64, total: Option<u64>) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    match total {
        Some(total) if total > 0 => {
            let frac = (done as f64 / total as f64).min(1.0);
            let filled = (frac * WIDTH as f64) as usize;
            let bar: String = (0..WIDTH)
                .map(|i| match i.cmp(&filled) {
                    std::cmp::Ordering::Less => '=',
                    std::cmp::Ordering::Equal => '>',
                    std::cmp::Ordering::Greater => ' ',
                })
                .collect();
            format!("{label} [{bar}] {:.1}/{:.1} MiB {:>3}%", mib(done), mib(total), (frac * 100.0) as u32)
        }
        _ => format!("{label} {:.1} MiB", mib(done)),
    }
}

/// Bytes in the regular files directly in `dir` and one level below.
fn bytes_in(dir: &Path) -> u64 {
    let mut sum = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(m) if m.is_file() => sum += m.len(),
            Ok(m) if m.is_dir() => {
                sum += std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()).map(|m| m.len()))
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    sum
}

/// Shows the growth of the files in a directory (a download landing there)
/// until dropped.
pub struct DirWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DirWatch {
    /// Starts watching `dir`, expecting `total` bytes if known.
    pub fn start(label: &str, dir: &Path, total: Option<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, label, dir): (_, String, PathBuf) = (stop.clone(), label.into(), dir.into());
        let tty = std::io::stderr().is_terminal();
        let thread = std::thread::spawn(move || {
            let mut quarter = 0;
            loop {
                let done = bytes_in(&dir);
                let stopping = flag.load(Ordering::Relaxed);
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r{}", render(&label, done, total));
                    if stopping {
                        let _ = writeln!(err);
                    }
                } else if let Some(total) = total.filter(|t| *t > 0) {
                    let q = (done.saturating_mul(4) / total).min(4);
                    if q > quarter {
                        quarter = q;
                        let _ = writeln!(err, "{}", render(&label, done, Some(total)));
                    }
                }
                drop(err);
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        DirWatch { stop, thread: Some(thread) }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A step of unknown length that a person waits on (packing a root
/// image): after a second it says so on stderr, with the time spent (redrawn
/// each second on a terminal, one line otherwise), and when dropped it
/// says how long it took. A step done within a second says nothing.
pub struct Step {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Step {
    /// Starts timing `label` (e.g. "vessel: packing /srv/root").
    pub fn start(label: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, label) = (stop.clone(), label.to_string());
        let tty = std::io::stderr().is_terminal();
        let thread = std::thread::spawn(move || {
            let began = std::time::Instant::now();
            let mut shown = false;
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                let secs = began.elapsed().as_secs_f64();
                if secs >= 1.0 || (shown && stopping) {
                    let mut err = std::io::stderr().lock();
                    match (tty, stopping) {
                        (true, false) => _ = write!(err, "\r{label}... {secs:.0} s"),
                        (true, true) => _ = writeln!(err, "\r{label}: done in {secs:.1} s"),
                        (false, false) if !shown => _ = writeln!(err, "{label}..."),
                        (false, true) => _ = writeln!(err, "{label}: done in {secs:.1} s"),
                        (false, false) => {}
                    }
                    shown = true;
                }
                if stopping {
                    return;
                }
                // Wakes often enough to end promptly once dropped.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Step { stop, thread: Some(thread) }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_render() {
        assert_eq!(render("kernel", 0, Some(4 << 20)), format!("kernel [>{}] 0.0/4.0 MiB   0%", " ".repeat(WIDTH - 1)));
        assert_eq!(
            render("kernel", 2 << 20, Some(4 << 20)),
            format!("kernel [{}>{}] 2.0/4.0 MiB  50%", "=".repeat(15), " ".repeat(14))
        );
        assert_eq!(
            render("kernel", 4 << 20, Some(4 << 20)),
            format!("kernel [{}] 4.0/4.0 MiB 100%", "=".repeat(WIDTH))
        );
        assert_eq!(render("kernel", 3 << 20, None), "kernel 3.0 MiB");
    }
}
