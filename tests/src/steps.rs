//! What a guest script reports about each command it ran.
//!
//! The script runs commands through the shell function `step NAME CMD...` (see
//! [`crate::guest::PRELUDE`]), which prints one block per command:
//!
//! ```text
//! @@STEP NAME STATUS
//! <stdout>
//! @@STDERR NAME
//! <stderr>
//! @@END NAME
//! ```
//!
//! (each marker preceded by a newline the block adds), after an `@@TIME NAME START END` line
//! with the guest's uptime around the command. [`Steps::parse`] turns the script's
//! output back into one [`Step`] per name; the assertions name the step and show its output when
//! they fail.

use std::collections::BTreeMap;

/// One command the guest ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The step's name.
    pub name: String,
    /// Its exit status.
    pub rc: i32,
    /// Its standard output, exactly.
    pub stdout: String,
    /// Its standard error, exactly.
    pub stderr: String,
    /// How long it ran in the guest (from `/proc/uptime`, 10 ms resolution), when reported.
    pub seconds: Option<f64>,
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

impl Step {
    /// A description for assertion messages: name, status, and both outputs (clipped).
    pub fn describe(&self) -> String {
        format!(
            "step `{}` exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.rc,
            clip(&self.stdout, 3000),
            clip(&self.stderr, 3000)
        )
    }

    /// Standard output parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    /// Standard output without surrounding white space.
    pub fn text(&self) -> &str {
        self.stdout.trim()
    }

    /// Standard output as one unsigned number.
    pub fn number(&self) -> u64 {
        self.text()
            .parse()
            .unwrap_or_else(|_| panic!("stdout is not a number:\n{}", self.describe()))
    }

    /// Asserts that standard error contains every one of `needles`.
    pub fn stderr_has(&self, needles: &[&str]) -> &Step {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr should contain {n:?}:\n{}",
                self.describe()
            );
        }
        self
    }

    /// Asserts that the step reported its error on one line and did not panic or print a
    /// backtrace.
    pub fn clean_error(&self) -> &Step {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            !lines.is_empty(),
            "a failing step should say why on stderr:\n{}",
            self.describe()
        );
        for bad in [
            "panicked",
            "internal error",
            "stack backtrace",
            "RUST_BACKTRACE",
        ] {
            assert!(
                !self.stderr.contains(bad),
                "stderr should not contain {bad:?}:\n{}",
                self.describe()
            );
        }
        self
    }
}

/// Every step of one guest run, by name.
#[derive(Debug, Clone, Default)]
pub struct Steps {
    map: BTreeMap<String, Step>,
    order: Vec<String>,
}

impl Steps {
    /// Parses the blocks out of a script's output. Text between blocks is ignored. Panics on a
    /// malformed block or a name used twice (both are bugs in the script).
    pub fn parse(output: &str) -> Steps {
        let mut steps = Steps::default();
        // "@@TIME NAME START END" lines (uptime seconds) precede the blocks.
        let times: BTreeMap<&str, f64> = output
            .lines()
            .filter_map(|l| l.strip_prefix("@@TIME "))
            .filter_map(|l| {
                let mut it = l.rsplitn(3, ' ');
                let end: f64 = it.next()?.parse().ok()?;
                let start: f64 = it.next()?.parse().ok()?;
                Some((it.next()?, end - start))
            })
            .collect();
        let mut rest = output;
        while let Some(i) = rest.find("@@STEP ") {
            let after = &rest[i + "@@STEP ".len()..];
            let Some(nl) = after.find('\n') else {
                // The script was cut off in the middle of a header.
                break;
            };
            let header = &after[..nl];
            let (name, rc) = header
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed step header {header:?}"));
            let rc: i32 = rc
                .parse()
                .unwrap_or_else(|_| panic!("malformed status in step header {header:?}"));
            let body = &after[nl + 1..];
            let err_marker = format!("\n@@STDERR {name}\n");
            let Some(j) = body.find(&err_marker) else {
                break;
            };
            let stdout = &body[..j];
            let body = &body[j + err_marker.len()..];
            let end_marker = format!("\n@@END {name}");
            let Some(k) = body.find(&end_marker) else {
                break;
            };
            let stderr = &body[..k];
            rest = &body[k + end_marker.len()..];
            rest = rest.strip_prefix('\n').unwrap_or(rest);
            let step = Step {
                name: name.to_string(),
                rc,
                stdout: stdout.to_string(),
                stderr: stderr.to_string(),
                seconds: times.get(name).copied(),
            };
            assert!(
                !steps.map.contains_key(name),
                "step name {name:?} used twice by the script"
            );
            steps.order.push(name.to_string());
            steps.map.insert(name.to_string(), step);
        }
        steps
    }

    /// The step called `name`; panics (listing the steps that did run) if there is none.
    pub fn get(&self, name: &str) -> &Step {
        self.map.get(name).unwrap_or_else(|| {
            panic!(
                "the guest reported no step `{name}`; steps that ran: {}",
                self.order.join(" ")
            )
        })
    }

    /// Whether a step called `name` ran.
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The step called `name`, asserting that it exited 0.
    pub fn ok(&self, name: &str) -> &Step {
        let s = self.get(name);
        assert_eq!(s.rc, 0, "expected success:\n{}", s.describe());
        s
    }

    /// The step called `name`, asserting that it exited `code` and explained itself cleanly.
    pub fn failed(&self, name: &str, code: i32) -> &Step {
        let s = self.get(name);
        assert_eq!(s.rc, code, "expected exit status {code}:\n{}", s.describe());
        s.clean_error()
    }

    /// Names of the steps in the order they ran.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no step ran.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_parsed_exactly() {
        let out = "noise\n\n@@STEP a 0\nline1\nline2\n\n@@STDERR a\n\n@@END a\n\
                   \n@@STEP b c 3\nno newline\n@@STDERR b c\nerr\n\n@@END b c";
        let s = Steps::parse(out);
        assert_eq!(s.names(), ["a", "b c"]);
        assert_eq!(s.get("a").stdout, "line1\nline2\n");
        assert_eq!(s.get("a").stderr, "");
        assert_eq!(s.get("a").rc, 0);
        assert_eq!(s.get("b c").rc, 3);
        assert_eq!(s.get("b c").stdout, "no newline");
        assert_eq!(s.get("b c").stderr, "err\n");
        assert_eq!(s.get("a").seconds, None);
    }

    #[test]
    fn times_are_attached() {
        let s =
            Steps::parse("\n@@TIME a b 10.25 12.75\n\n@@STEP a b 0\n\n@@STDERR a b\n\n@@END a b\n");
        assert_eq!(s.get("a b").seconds, Some(2.5));
    }

    #[test]
    fn truncated_block_is_dropped() {
        let s = Steps::parse("\n@@STEP a 0\nx\n@@STDERR a\n\n@@END a\n\n@@STEP b 0\npartial");
        assert_eq!(s.names(), ["a"]);
        assert!(!s.has("b"));
    }

    #[test]
    #[should_panic(expected = "used twice")]
    fn duplicate_names_are_refused() {
        Steps::parse(
            "\n@@STEP a 0\n\n@@STDERR a\n\n@@END a\n\n@@STEP a 0\n\n@@STDERR a\n\n@@END a\n",
        );
    }

    #[test]
    #[should_panic(expected = "expected exit status 2")]
    fn failed_checks_the_status() {
        let s = Steps::parse("\n@@STEP a 1\n\n@@STDERR a\nrnvme: error: x\n\n@@END a\n");
        s.failed("a", 2);
    }

    #[test]
    #[should_panic(expected = "should not contain \"panicked\"")]
    fn clean_error_refuses_panics() {
        let s =
            Steps::parse("\n@@STEP a 1\n\n@@STDERR a\nthread 'main' panicked at x\n\n@@END a\n");
        s.failed("a", 1);
    }

    #[test]
    #[should_panic(expected = "no step `z`")]
    fn missing_step_panics() {
        Steps::parse("").get("z");
    }
}
