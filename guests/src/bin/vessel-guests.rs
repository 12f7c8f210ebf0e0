//! `vessel-guests --out DIR`: writes every test guest image into DIR and
//! prints the paths written, one per line.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: vessel-guests --out DIR\n\
                     Writes the test guest images (hello/report/spin/virtio x pvh.elf/linux64.elf/bzimage) into DIR.";

fn main() -> ExitCode {
    let mut out = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--out") => match args.next() {
                Some(dir) => out = Some(PathBuf::from(dir)),
                None => return usage_error("--out needs a directory"),
            },
            Some(s) if s.starts_with("--out=") => out = Some(PathBuf::from(&s["--out=".len()..])),
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => return usage_error(&format!("unexpected argument {arg:?}")),
        }
    }
    let Some(dir) = out else {
        return usage_error("--out is required");
    };
    match guests::write_all(&dir) {
        Ok(paths) => {
            for path in paths {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vessel-guests: cannot write the images into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("vessel-guests: {message}\n{USAGE}");
    ExitCode::from(2)
}
