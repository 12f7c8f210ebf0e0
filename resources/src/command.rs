//! Running host tools (apt-get, dpkg-deb, xz, ...) with errors that name the
//! command and carry what it printed on stderr.

use std::process::{Command, Output};

/// A host command that could not be run or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (usually: not installed).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

/// The command line of `cmd`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin closed) and returns its output, or an
/// error naming the command and its stderr if it did not exit with 0.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, CommandError> {
    let command = describe(cmd);
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(CommandError::Failed { command, status: output.status, stderr });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_its_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c echo oops >&2; exit 3` failed"), "{msg}");
        assert!(msg.ends_with(": oops"), "{msg}");
        let err = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert_eq!(err.to_string(), "cannot run `/nonexistent/tool`");
        assert_eq!(run(Command::new("sh").args(["-c", "echo hi"])).unwrap().stdout, b"hi\n");
    }
}
