//! A process's stdio: streams to the host (one per port the request
//! named), joined to the process by pipes or a terminal, with a thread
//! copying each way.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use agent_proto::agent::Stdio as StdioPorts;

use crate::link::HostLink;

/// Setting up a process's stdio failed.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The host's end of a stream could not be reached.
    #[error("cannot open the {0} stream")]
    Dial(&'static str, #[source] std::io::Error),
    /// A pipe, a terminal, /dev/null or a descriptor copy could not be had.
    #[error("cannot make the process's {0}")]
    Local(&'static str, #[source] std::io::Error),
}

/// The copying between a process's stdio and the host's streams, to start
/// once the process has its ends.
pub struct Copier {
    copies: Vec<(File, File, bool)>,
    /// The terminal's master side, kept open while copying runs so that
    /// the process's output is not cut off.
    master: Option<OwnedFd>,
}

/// The process's ends: what it gets as stdin, stdout and stderr.
pub type ChildEnds = [OwnedFd; 3];

fn dev_null() -> Result<OwnedFd, StdioError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| StdioError::Local("/dev/null", e))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    crate::launch::pipe().map_err(|e| StdioError::Local("pipe", e))
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, StdioError> {
    fd.try_clone().map_err(|e| StdioError::Local("descriptor copy", e))
}

fn dial(link: &HostLink, port: u32, what: &'static str) -> Result<Option<File>, StdioError> {
    match port {
        0 => Ok(None),
        port => link.dial(port).map(|fd| Some(File::from(fd))).map_err(|e| StdioError::Dial(what, e)),
    }
}

/// Dials the host for each stream and builds the process's ends.
/// With a terminal, `console_size` (rows, columns) is its size from the
/// start.
pub fn plumb(
    link: &HostLink,
    ports: &StdioPorts,
    terminal: bool,
    console_size: Option<(u16, u16)>,
) -> Result<(ChildEnds, Copier), StdioError> {
    let stdin = dial(link, ports.stdin_port, "stdin")?;
    let stdout = dial(link, ports.stdout_port, "stdout")?;
    if terminal {
        let (master, slave) = open_pty()?;
        if let Some((rows, columns)) = console_size {
            resize(&master, rows, columns).map_err(|e| StdioError::Local("terminal", e))?;
        }
        let mut copies = Vec::new();
        if let Some(stream) = stdin {
            copies.push((stream, File::from(dup(&master)?), false));
        }
        if let Some(stream) = stdout {
            copies.push((File::from(dup(&master)?), stream, true));
        }
        let child = [dup(&slave)?, dup(&slave)?, slave];
        return Ok((child, Copier { copies, master: Some(master) }));
    }
    // The same port for both: one stream, like `2>&1`.
    let shared = ports.stderr_port != 0 && ports.stderr_port == ports.stdout_port;
    let stderr = if shared { None } else { dial(link, ports.stderr_port, "stderr")? };
    let mut copies = Vec::new();
    let child_in = match stdin {
        Some(stream) => {
            let (read, write) = pipe()?;
            copies.push((stream, File::from(write), false));
            read
        }
        None => dev_null()?,
    };
    let output = |copies: &mut Vec<(File, File, bool)>, stream: Option<File>| -> Result<OwnedFd, StdioError> {
        match stream {
            Some(stream) => {
                let (read, write) = pipe()?;
                copies.push((File::from(read), stream, true));
                Ok(write)
            }
            None => dev_null(),
        }
    };
    let child_out = output(&mut copies, stdout)?;
    let child_err = if shared { dup(&child_out)? } else { output(&mut copies, stderr)? };
    Ok(([child_in, child_out, child_err], Copier { copies, master: None }))
}

impl Copier {
    /// A descriptor of the terminal's master side, for resizing it; None
    /// when the process has no terminal.
    pub fn terminal(&self) -> Result<Option<OwnedFd>, StdioError> {
        self.master.as_ref().map(dup).transpose()
    }

    /// Starts copying. Call it once the process's ends are handed over and
    /// closed here: a pipe reads end-of-file only once every write end is
    /// closed.
    pub fn start(self) {
        let master = self.master;
        let copies = self.copies;
        let count = copies.len();
        let master = std::sync::Arc::new(master);
        for (i, (mut from, mut to, to_host)) in copies.into_iter().enumerate() {
            let master = master.clone();
            let _ = std::thread::Builder::new().name(format!("stdio-{i}/{count}")).spawn(move || {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    // A terminal reads EIO once the process side is closed.
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                if to_host {
                    // SAFETY: shutdown on a descriptor we own.
                    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
                }
                drop(master);
            });
        }
    }
}

/// Sets the size of the terminal whose master side is `master` (the
/// process's foreground group gets SIGWINCH).
pub fn resize(master: &OwnedFd, rows: u16, columns: u16) -> std::io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize, which `size` is, from a
    // descriptor we own.
    match unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn open_pty() -> Result<(OwnedFd, OwnedFd), StdioError> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: out-pointers to two ints; no name, termios or winsize.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if r != 0 {
        return Err(StdioError::Local("terminal", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: as above.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}
