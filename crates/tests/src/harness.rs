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
