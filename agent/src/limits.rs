//! cgroup v2 limits as a spec or an update asks for them, checked: what
//! [`crate::cgroup::apply`] writes, and nothing it could not.

/// A limit that is either a value or lifted ("max" in the cgroup file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit<T> {
    /// Limited to this.
    To(T),
    /// No limit: "max".
    Unlimited,
}

/// cgroup v2 limits asked for by a spec or an update; `None` leaves a
/// limit as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.max in bytes.
    pub memory: Option<Limit<u64>>,
    /// cpu.max: (quota, period) in microseconds.
    pub cpu: Option<Limit<(u64, u64)>>,
    /// pids.max.
    pub pids: Option<Limit<u64>>,
    /// cpu.weight (1-10000).
    pub cpu_weight: Option<u64>,
    /// cpuset.cpus, in the kernel's list format.
    pub cpuset_cpus: Option<String>,
    /// cpuset.mems, in the kernel's list format.
    pub cpuset_mems: Option<String>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.memory.is_some()
            || self.cpu.is_some()
            || self.pids.is_some()
            || self.cpu_weight.is_some()
            || self.cpuset_cpus.is_some()
            || self.cpuset_mems.is_some()
    }

    /// Whether the limits need the cpuset controller.
    pub fn need_cpuset(&self) -> bool {
        self.cpuset_cpus.is_some() || self.cpuset_mems.is_some()
    }
}

/// A limit the agent refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    /// A CPU weight outside cgroup v2's range.
    #[error("cpu weight {0} is not between 1 and 10000")]
    Weight(u64),
    /// Both a weight and shares (one of them says what the other does).
    #[error("cpu shares and cpu weight are both set: give one")]
    SharesAndWeight,
    /// A cpuset list that is not the kernel's list format.
    #[error("{what} {value:?} is not a list of numbers and ranges (\"0-2,4\")")]
    Cpuset {
        /// cpuset.cpus or cpuset.mems.
        what: &'static str,
        /// What was asked for.
        value: String,
    },
    /// A value and "unlimited" for the same limit.
    #[error("{0} is given a value and told to be unlimited")]
    Both(&'static str),
    /// A CPU quota with a zero period.
    #[error("cpu quota {0} with a period of 0")]
    ZeroCpuPeriod(u64),
}

/// The cgroup v2 cpu.weight for OCI cpu shares (cgroup v1's scale, 2 to
/// 262144; clamped there, as the v1 kernel does), mapped as runc maps them
/// so that a container gets the same weight under either runtime.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// A cpu.weight, checked.
pub fn check_weight(weight: u64) -> Result<u64, LimitsError> {
    match weight {
        1..=10_000 => Ok(weight),
        w => Err(LimitsError::Weight(w)),
    }
}

/// A cpuset list ("0-2,4"), checked before it is written to a cgroup file:
/// numbers, ranges and commas only, 1-1024 bytes.
pub fn check_cpuset(what: &'static str, value: &str) -> Result<String, LimitsError> {
    let number = |s: &str| !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    let item = |s: &str| match s.split_once('-') {
        Some((a, b)) => number(a) && number(b),
        None => number(s),
    };
    match value.len() <= 1024 && value.split(',').all(item) {
        true => Ok(value.to_string()),
        false => Err(LimitsError::Cpuset { what, value: value.into() }),
    }
}

/// A limit from an update: a value (0: none), or lifted.
pub fn update_limit<T>(what: &'static str, value: Option<T>, unlimited: bool) -> Result<Option<Limit<T>>, LimitsError> {
    match (value, unlimited) {
        (Some(_), true) => Err(LimitsError::Both(what)),
        (Some(v), false) => Ok(Some(Limit::To(v))),
        (None, true) => Ok(Some(Limit::Unlimited)),
        (None, false) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_map_to_weight_as_runc_maps_them() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Outside v1's range: clamped, never an overflow.
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn cpuset_lists_are_numbers_ranges_and_commas_only() {
        for good in ["0", "0-1", "0-2,4", "1,3,5-7"] {
            assert_eq!(check_cpuset("cpuset.cpus", good).as_deref(), Ok(good));
        }
        for bad in ["", "0-", "-1", "a", "0\n1", "0,,1", "0 1", "1-2-3", &"1,".repeat(600)] {
            let err = check_cpuset("cpuset.mems", bad).unwrap_err().to_string();
            assert!(err.contains("cpuset.mems"), "{err}");
        }
    }

    #[test]
    fn a_weight_outside_cgroup_v2s_range_is_refused() {
        assert_eq!(check_weight(100), Ok(100));
        assert_eq!(check_weight(0), Err(LimitsError::Weight(0)));
        assert_eq!(check_weight(10_001), Err(LimitsError::Weight(10_001)));
    }

    #[test]
    fn a_limit_given_a_value_and_unlimited_is_refused() {
        assert_eq!(update_limit("memory limit", Some(5), false), Ok(Some(Limit::To(5))));
        assert_eq!(update_limit::<u64>("memory limit", None, true), Ok(Some(Limit::Unlimited)));
        assert_eq!(update_limit::<u64>("memory limit", None, false), Ok(None));
        assert_eq!(update_limit("memory limit", Some(5), true), Err(LimitsError::Both("memory limit")));
    }
}
