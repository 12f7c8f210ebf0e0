//! What the custom test harnesses (libtest-mimic) share: a test that
//! cannot run on this machine is reported as skipped, by name, with the
//! reason, never passed in silence.

use std::path::Path;

use libtest_mimic::{Failed, Trial};

/// A test from a function returning `anyhow::Result`; an error fails it
/// with its whole chain.
pub fn trial(name: impl Into<String>, f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> Trial {
    Trial::test(name, move || f().map_err(|e| Failed::from(format!("{e:#}"))))
}

/// `trials`, each marked skipped (and `skipped NAME: reason` printed) when
/// `reason` is Some.
pub fn gate(reason: Option<String>, trials: impl IntoIterator<Item = Trial>) -> Vec<Trial> {
    trials
        .into_iter()
        .map(|t| match &reason {
            Some(reason) => {
                eprintln!("skipped {}: {reason}", t.name());
                t.with_ignored_flag(true)
            }
            None => t,
        })
        .collect()
}

/// The first of `tools` not on PATH, as a skip reason naming `package`.
pub fn missing_tool(tools: &[&str], package: &str) -> Option<String> {
    tools.iter().find_map(|tool| {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|p| Path::new(&p).join(tool).exists()));
        (!found).then(|| format!("`{tool}` ({package}) is not installed"))
    })
}

/// Why ext4 images (mkfs.ext4 and friends) cannot be made here.
pub fn e2fsprogs_unavailable() -> Option<String> {
    missing_tool(&["mkfs.ext4", "e2fsck", "debugfs"], "e2fsprogs")
}

/// A binary of this workspace that cargo built next to the running test
/// (`target/<triple>/<profile>/NAME`). `cargo test` builds a package's
/// binaries only for that package's own integration tests, so the test
/// script builds them first (`cargo build --workspace --bins`). Panics
/// with that command when it is missing, since no test can use it then.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    // The test runs as target/<triple>/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().expect("the running test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join(name);
    assert!(
        binary.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        binary.display()
    );
    binary
}

/// Set in a child process of a test binary: it runs the one child trial it
/// is asked for (see [`in_child`]).
pub const CHILD_ENV: &str = "VESSEL_TEST_CHILD";

/// Whether this process is such a child.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs trial `name` alone in a child process of this test binary (a
/// process of its own: its threads, signals and seccomp filters are not
/// shared with other trials), and fails unless it passed.
pub fn in_child(name: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success() && stdout.contains(" 1 passed"),
        "child {name} ended with {:?}; stdout: {stdout}; stderr: {stderr}",
        out.status
    );
    Ok(())
}
