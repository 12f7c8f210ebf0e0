//! The user's side of a container process in the foreground: its stdio
//! copied to and from ours, our terminal in raw mode while it has one
//! (window-size changes forwarded), and our SIGINT, SIGTERM, SIGHUP and
//! SIGQUIT sent on to it.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use runtime_api::sandbox::STREAM_TIMEOUT;
use runtime_api::{ProcessIo, Sandbox, Store};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::{Handle, Signals};

/// Our terminal in raw mode, restored when dropped.
pub(crate) struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Puts stdin's terminal in raw mode; None when stdin is no terminal.
    pub(crate) fn enter() -> Option<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios it is given, on success.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: tcgetattr succeeded, so `saved` is initialized.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads the termios it is given.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the termios saved when raw mode began.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Our terminal's size (rows, columns), if stdout is one.
pub(crate) fn window_size() -> Option<(u32, u32)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`.
    let rc = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then(|| (u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// A process in the foreground: its streams copied, our signals forwarded.
pub(crate) struct Foreground {
    streams: Vec<JoinHandle<Result<(), runtime_api::agent::AgentError>>>,
    signals: Handle,
    forwarder: Option<JoinHandle<()>>,
}

impl Foreground {
    /// Copies `io` to and from our stdio and forwards our signals to
    /// process `exec_id` of container `container` in sandbox `sandbox`
    /// (through a handle of its own); with `terminal`, window-size changes
    /// too.
    pub(crate) fn attach(
        store: &Store,
        sandbox: &str,
        container: &str,
        exec_id: &str,
        io: ProcessIo,
        terminal: bool,
    ) -> anyhow::Result<Foreground> {
        let mut streams = vec![io.stdout.collect_into(std::io::stdout(), STREAM_TIMEOUT)];
        streams.extend(io.stderr.map(|s| s.collect_into(std::io::stderr(), STREAM_TIMEOUT)));
        if let Some(stdin) = io.stdin {
            std::thread::spawn(move || {
                if let Ok(mut conn) = stdin.accept(STREAM_TIMEOUT) {
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut conn);
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                }
            });
        }
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH])?;
        let handle = signals.handle();
        let mut target = Sandbox::fetch(store, sandbox)?;
        let (container, exec_id) = (container.to_string(), exec_id.to_string());
        if terminal {
            if let Some((rows, columns)) = window_size() {
                let _ = target.resize_terminal(&container, &exec_id, rows, columns);
            }
        }
        let forwarder = std::thread::spawn(move || {
            for signal in signals.forever() {
                let sent = match signal {
                    SIGWINCH if terminal => match window_size() {
                        Some((rows, columns)) => target.resize_terminal(&container, &exec_id, rows, columns),
                        None => Ok(()),
                    },
                    SIGWINCH => Ok(()),
                    other => target.signal_process(&container, &exec_id, other as u32),
                };
                if let Err(e) = sent {
                    tracing::warn!(signal, error = %e, "cannot forward a signal to the container");
                }
            }
        });
        Ok(Foreground { streams, signals: handle, forwarder: Some(forwarder) })
    }

    /// Waits for the output streams to end and stops forwarding.
    pub(crate) fn finish(mut self) {
        for stream in self.streams.drain(..) {
            let _ = stream.join();
        }
        self.signals.close();
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.join();
        }
    }
}
