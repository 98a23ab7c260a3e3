//! CPU selection for reactors: SPDK-style masks (`-m 0x3`, `-m [0,2-3]`) and core lists
//! (`--cores 0,1`), defaulting to every CPU the process may run on, so `taskset` and
//! cgroup cpusets are respected.

use std::fmt;

/// CPUs the kernel's affinity calls can name (`CPU_SETSIZE`).
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// An ordered set of CPU numbers: reactor `i` runs on `cpus()[i]`.
#[derive(Clone, PartialEq, Eq)]
pub struct CpuSet {
    cpus: Vec<usize>,
}

impl CpuSet {
    /// Every CPU this process is allowed to run on (`sched_getaffinity`).
    pub fn allowed() -> CpuSet {
        // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: we pass the size of the set we own.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return CpuSet { cpus: vec![0] };
        }
        let cpus = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i is below CPU_SETSIZE, the set's capacity.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect();
        CpuSet { cpus }
    }

    /// The first `n` CPUs this process may use (tests start engines of a given size);
    /// an error says how many there are.
    pub fn first_allowed(n: usize) -> Result<CpuSet, String> {
        let allowed = CpuSet::allowed();
        if allowed.len() < n {
            return Err(format!(
                "{n} reactors need {n} CPUs, but this process may only use CPUs {allowed}"
            ));
        }
        Ok(CpuSet::from_cpus(allowed.cpus()[..n].iter().copied()))
    }

    /// A set of the given CPUs (order kept, duplicates removed).
    pub fn from_cpus(cpus: impl IntoIterator<Item = usize>) -> CpuSet {
        let mut seen = std::collections::HashSet::new();
        CpuSet {
            cpus: cpus.into_iter().filter(|c| seen.insert(*c)).collect(),
        }
    }

    /// Parses a core list (`0,1,4-6`, optionally in brackets) or a hex mask (`0x3`).
    pub fn parse(s: &str) -> Result<CpuSet, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            let mask = u128::from_str_radix(hex, 16)
                .map_err(|_| format!("bad CPU mask '{s}': expected hex like 0x3"))?;
            let cpus: Vec<usize> = (0..128).filter(|i| mask & (1u128 << i) != 0).collect();
            if cpus.is_empty() {
                return Err(format!("CPU mask '{s}' selects no CPU"));
            }
            return Ok(CpuSet { cpus });
        }
        let inner = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        let mut cpus = Vec::new();
        for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("bad CPU list '{s}': expected e.g. 0,1 or 0-3");
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: usize = a.trim().parse().map_err(|_| bad())?;
                    let b: usize = b.trim().parse().map_err(|_| bad())?;
                    if a > b {
                        return Err(bad());
                    }
                    if b >= MAX_CPUS {
                        return Err(format!(
                            "CPU {b} in '{s}' is beyond the largest CPU number ({})",
                            MAX_CPUS - 1
                        ));
                    }
                    cpus.extend(a..=b);
                }
                None => {
                    let c: usize = part.parse().map_err(|_| bad())?;
                    if c >= MAX_CPUS {
                        return Err(format!(
                            "CPU {c} in '{s}' is beyond the largest CPU number ({})",
                            MAX_CPUS - 1
                        ));
                    }
                    cpus.push(c);
                }
            }
        }
        if cpus.is_empty() {
            return Err(format!("CPU list '{s}' selects no CPU"));
        }
        Ok(CpuSet::from_cpus(cpus))
    }

    /// Checks every CPU is one this process may use.
    pub fn check_allowed(&self) -> Result<(), String> {
        let allowed = CpuSet::allowed();
        match self.cpus.iter().find(|c| !allowed.cpus.contains(c)) {
            Some(c) => Err(format!(
                "CPU {c} is not available to this process (allowed: {allowed})"
            )),
            None => Ok(()),
        }
    }

    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    /// The SPDK-style mask (`0x3`) for display.
    pub fn mask(&self) -> String {
        let mask = self
            .cpus
            .iter()
            .filter(|&&c| c < 128)
            .fold(0u128, |m, &c| m | (1 << c));
        format!("{mask:#x}")
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.cpus.iter().map(|c| c.to_string()).collect();
        f.write_str(&list.join(","))
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet[{self}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_ranges_brackets_and_masks() {
        assert_eq!(CpuSet::parse("0,1").unwrap().cpus(), &[0, 1]);
        assert_eq!(CpuSet::parse("[0,2-4]").unwrap().cpus(), &[0, 2, 3, 4]);
        assert_eq!(CpuSet::parse("0x5").unwrap().cpus(), &[0, 2]);
        assert_eq!(CpuSet::parse("1,1,0").unwrap().cpus(), &[1, 0]);
        assert_eq!(CpuSet::parse("0x5").unwrap().mask(), "0x5");
    }

    #[test]
    fn rejects_nonsense_with_a_message() {
        for bad in ["", "x", "3-1", "0x", "0x0", "1,,a", "0-4000000000", "99999"] {
            let e = CpuSet::parse(bad).unwrap_err();
            assert!(
                e.contains(bad) || e.contains("no CPU") || e.contains("beyond"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn default_is_what_the_process_may_use() {
        let a = CpuSet::allowed();
        assert!(!a.is_empty());
        assert!(a.check_allowed().is_ok());
        assert!(CpuSet::from_cpus([100_000]).check_allowed().is_err());
    }
}
