//! A guest's identity (`SetGuestIdentity`): what the host may ask for,
//! checked in one place that the agent, the mock agent and the host share.
//! The check is pure, so the agent runs it before changing anything and
//! the fuzzer runs it on any bytes.

use crate::agent::SetGuestIdentityRequest;

/// The longest hostname Linux takes (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;
/// The least entropy a request brings, in bytes (a CRNG key's worth).
pub const MIN_ENTROPY: usize = 16;
/// The most entropy a request brings, in bytes (the kernel's input pool
/// takes no more at once).
pub const MAX_ENTROPY: usize = 512;

/// Why an identity request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The hostname is empty, too long, or has a character it may not.
    #[error("the hostname {name:?} {why}")]
    Hostname {
        /// The hostname as given (cut to 80 characters).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The time is before the epoch or its nanoseconds are a second or more.
    #[error("the time {sec} s + {nsec} ns is not a valid wall-clock time")]
    Time {
        /// Seconds.
        sec: i64,
        /// Nanoseconds.
        nsec: u32,
    },
    /// Too little or too much entropy.
    #[error("{0} bytes of entropy: between {MIN_ENTROPY} and {MAX_ENTROPY} are taken")]
    Entropy(usize),
}

/// An identity request that passed [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The hostname.
    pub hostname: String,
    /// The wall clock: seconds since the epoch.
    pub sec: i64,
    /// And nanoseconds.
    pub nsec: u32,
    /// The entropy.
    pub entropy: Vec<u8>,
}

/// Checks a hostname: 1 to [`MAX_HOSTNAME`] bytes of letters, digits,
/// '-', '.' and '_', starting with a letter or a digit. Linux takes any
/// bytes; this keeps what a sandbox ID may be, which is what tools that
/// print a hostname expect.
pub fn check_hostname(name: &str) -> Result<(), IdentityError> {
    let refuse = |why| Err(IdentityError::Hostname { name: name.chars().take(80).collect(), why });
    if name.is_empty() {
        return refuse("is empty");
    }
    if name.len() > MAX_HOSTNAME {
        return refuse("is longer than 64 bytes");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse("must start with a letter or a digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return refuse("may hold only letters, digits, '-', '.' and '_'");
    }
    Ok(())
}

/// Checks every field of `request`; nothing is applied until all pass.
pub fn check(request: &SetGuestIdentityRequest) -> Result<Identity, IdentityError> {
    check_hostname(&request.hostname)?;
    if request.time_sec < 0 || request.time_nsec >= 1_000_000_000 {
        return Err(IdentityError::Time { sec: request.time_sec, nsec: request.time_nsec });
    }
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&request.entropy.len()) {
        return Err(IdentityError::Entropy(request.entropy.len()));
    }
    Ok(Identity {
        hostname: request.hostname.clone(),
        sec: request.time_sec,
        nsec: request.time_nsec,
        entropy: request.entropy.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(hostname: &str, sec: i64, nsec: u32, entropy: usize) -> SetGuestIdentityRequest {
        SetGuestIdentityRequest {
            hostname: hostname.into(),
            time_sec: sec,
            time_nsec: nsec,
            entropy: vec![7; entropy],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_passes_whole() {
        let identity = check(&request("sandbox-1.vessel_a", 1_700_000_000, 999_999_999, 32)).unwrap();
        assert_eq!(identity.hostname, "sandbox-1.vessel_a");
        assert_eq!((identity.sec, identity.nsec), (1_700_000_000, 999_999_999));
        assert_eq!(identity.entropy, vec![7; 32]);
        assert!(check(&request(&"a".repeat(64), 0, 0, MIN_ENTROPY)).is_ok());
        assert!(check(&request("a", 0, 0, MAX_ENTROPY)).is_ok());
    }

    #[test]
    fn every_bad_field_is_named() {
        for (bad, want) in [
            (request("", 1, 0, 32), "is empty"),
            (request(&"a".repeat(65), 1, 0, 32), "longer than 64"),
            (request("-a", 1, 0, 32), "start with a letter"),
            (request(".a", 1, 0, 32), "start with a letter"),
            (request("a b", 1, 0, 32), "only letters"),
            (request("a/b", 1, 0, 32), "only letters"),
            (request("é", 1, 0, 32), "start with a letter"),
            (request("a\0", 1, 0, 32), "only letters"),
            (request("h", -1, 0, 32), "not a valid wall-clock time"),
            (request("h", 1, 1_000_000_000, 32), "not a valid wall-clock time"),
            (request("h", 1, 0, MIN_ENTROPY - 1), "15 bytes of entropy"),
            (request("h", 1, 0, MAX_ENTROPY + 1), "513 bytes of entropy"),
            (request("h", 1, 0, 0), "0 bytes of entropy"),
        ] {
            let err = check(&bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }
}
