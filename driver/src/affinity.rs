//! Pinning threads to CPUs, as polling drivers do with their reactors and workers (through
//! rustix's safe wrappers of the affinity system calls).
//!
//! Where threads that hand work to each other sit matters as much as how fast each one is: a
//! thread woken on another CPU that sleeps (halted) costs that CPU's wake-up, which on some
//! machines — emulated CPUs above all — takes longer than the work handed over.

use std::fmt;
use std::str::FromStr;

/// Pinning failed.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// The CPU is not one this process may run on.
    #[error(
        "CPU {cpu} is not available to this process (it may run on CPUs {allowed}): pick one of those"
    )]
    NotAllowed { cpu: usize, allowed: CpuList },
    /// The kernel refused.
    #[error("cannot {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A set of CPU numbers, written the way the kernel writes them (`0-3,6`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// The set of `cpus` (sorted, without repeats).
    pub fn new(mut cpus: Vec<usize>) -> CpuList {
        cpus.sort_unstable();
        cpus.dedup();
        CpuList(cpus)
    }

    /// The CPUs, in increasing order.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let mut i = 0;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if i > 0 {
                f.write_str(",")?;
            }
            if j > i {
                write!(f, "{}-{}", self.0[i], self.0[j])?;
            } else {
                write!(f, "{}", self.0[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// The highest CPU number a list may name.
pub const MAX_CPU: usize = rustix::thread::CpuSet::MAX_CPU - 1;

impl FromStr for CpuList {
    type Err = String;

    /// `0`, `0,2`, `0-3,6`.
    fn from_str(s: &str) -> Result<CpuList, String> {
        let num = |p: &str| -> Result<usize, String> {
            let n: usize = p
                .trim()
                .parse()
                .map_err(|_| format!("{p:?} in CPU list {s:?} is not a CPU number"))?;
            if n > MAX_CPU {
                return Err(format!(
                    "CPU {n} in {s:?} is beyond the last possible CPU, {MAX_CPU}"
                ));
            }
            Ok(n)
        };
        let mut cpus = Vec::new();
        for part in s.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("CPU range {part:?} runs backwards: write {b}-{a}"));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        Ok(CpuList::new(cpus))
    }
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<CpuList, AffinityError> {
    let set = rustix::thread::sched_getaffinity(None).map_err(|e| AffinityError::Os {
        what: "read this thread's CPU affinity",
        source: e.into(),
    })?;
    Ok(CpuList((0..=MAX_CPU).filter(|&c| set.is_set(c)).collect()))
}

/// Run the calling thread on `cpu` only, which must be one of [`allowed_cpus`].
pub fn pin_current_thread(cpu: usize) -> Result<(), AffinityError> {
    let allowed = allowed_cpus()?;
    if !allowed.contains(cpu) {
        return Err(AffinityError::NotAllowed { cpu, allowed });
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| AffinityError::Os {
        what: "pin this thread to a CPU",
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_like_the_kernels() {
        let l: CpuList = "3,0-1,1,7-9".parse().unwrap();
        assert_eq!(l.cpus(), &[0, 1, 3, 7, 8, 9]);
        assert_eq!(l.to_string(), "0-1,3,7-9");
        assert!(l.contains(8) && !l.contains(2));
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert_eq!(CpuList::default().to_string(), "none");
        for bad in ["", "a", "1-", "3-1", "0,,1", "99999"] {
            let e = bad.parse::<CpuList>().unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) || e.contains("CPU"),
                "{bad}: {e}"
            );
        }
        assert!("3-1".parse::<CpuList>().unwrap_err().contains("write 1-3"));
    }

    #[test]
    fn a_thread_pins_to_an_allowed_cpu_and_refuses_others() {
        let allowed = allowed_cpus().unwrap();
        let first = allowed.cpus()[0];
        let missing = (0..=MAX_CPU).find(|c| !allowed.contains(*c)).unwrap();
        std::thread::spawn(move || {
            pin_current_thread(first).unwrap();
            assert_eq!(allowed_cpus().unwrap().cpus(), &[first]);
            let e = pin_current_thread(missing).unwrap_err();
            assert!(matches!(e, AffinityError::NotAllowed { cpu, .. } if cpu == missing));
            assert!(e.to_string().contains(&format!("CPUs {first}")), "{e}");
        })
        .join()
        .unwrap();
        // The calling thread keeps its own set.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }
}
