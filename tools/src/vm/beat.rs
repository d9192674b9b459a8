//! The guest's heartbeat: how the host tells a guest that stopped from a script that hangs.
//!
//! QEMU's TCG now and then loses a halted vCPU's timer interrupt: with every vCPU halted the
//! guest stops for good, its clock with it, and nothing on its console says so. `/init` starts
//! a loop before the script that prints a line on the console every [`BEAT_EVERY_S`] seconds:
//! the guest's uptime and the step the script says it is in. The runner reads the console as
//! the guest runs: a guest whose beats stop has stopped (the runner boots it again or reports
//! [`super::VmError::Stalled`]); a guest whose beats go on while the script never ends has a
//! script that hangs, and the last beat says in which step.
//!
//! A script names its step by writing `UPTIME NAME` (the guest's `/proc/uptime` seconds when
//! the step began, then its name) to [`STEP_FILE`] and removing the file when the step ends.
//! A step that runs longer than [`super::VmConfig::state_dump_after`] gets the state of every
//! task of the guest (its state, wait channel and kernel stack) on the console, once: the
//! picture of a hang while it hangs.

use std::time::Duration;

/// Where a guest script names the step it is in (`UPTIME NAME`).
pub const STEP_FILE: &str = "/run/rnvme-step";

/// Seconds between two beats.
pub const BEAT_EVERY_S: u32 = 2;

/// The prefixes of the heartbeat's console lines, with the run's token (no kernel message can
/// carry it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BeatMarkers {
    /// `RNVME-BEAT-<token>`, then ` UPTIME [STEP_START STEP_NAME]`.
    pub beat: String,
    /// `RNVME-STATE-<token>`: the first and last line of a state dump.
    pub state: String,
}

/// One beat: the guest's uptime and the step it was in.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    /// The guest's uptime in seconds.
    pub uptime: f64,
    /// The step running, with the uptime it began at.
    pub step: Option<(f64, String)>,
}

impl Beat {
    /// "at 123 s of uptime, in step NAME for 45 s".
    pub fn describe(&self) -> String {
        match &self.step {
            Some((start, name)) => format!(
                "at {:.0} s of uptime, in step '{name}' for {:.0} s",
                self.uptime,
                (self.uptime - start).max(0.0)
            ),
            None => format!("at {:.0} s of uptime, in no named step", self.uptime),
        }
    }
}

impl BeatMarkers {
    pub fn new(token: &str) -> Self {
        BeatMarkers {
            beat: format!("RNVME-BEAT-{token}"),
            state: format!("RNVME-STATE-{token}"),
        }
    }

    /// The last complete beat line in `console`.
    pub fn last_beat(&self, console: &str) -> Option<Beat> {
        let mut at = console.len();
        loop {
            let i = console[..at].rfind(&self.beat)?;
            let rest = &console[i + self.beat.len()..];
            if let Some(end) = rest.find('\n') {
                if let Some(b) = parse_beat(&rest[..end]) {
                    return Some(b);
                }
            }
            at = i;
        }
    }

    /// `console` without its beat lines (the state dumps stay: they are for reading).
    pub fn without_beats(&self, console: &str) -> String {
        let mut out = String::with_capacity(console.len());
        for line in console.split_inclusive('\n') {
            if !line.starts_with(&self.beat) {
                out.push_str(line);
            }
        }
        out
    }

    /// `console` without its state dumps.
    pub fn without_states(&self, console: &str) -> String {
        let begin = format!("{} begin", self.state);
        let end = format!("{} end", self.state);
        let mut out = String::with_capacity(console.len());
        let mut inside = false;
        for line in console.split_inclusive('\n') {
            if line.starts_with(&begin) {
                inside = true;
            }
            if !inside {
                out.push_str(line);
            }
            if inside && line.starts_with(&end) {
                inside = false;
            }
        }
        out
    }

    /// The last state dump in `console` (its begin line to its end line), if any.
    pub fn last_state(&self, console: &str) -> Option<String> {
        let begin = format!("{} begin", self.state);
        let i = console.rfind(&begin)?;
        let dump = &console[i..];
        let end = format!("{} end", self.state);
        Some(match dump.find(&end) {
            Some(j) => dump[..j + end.len()].to_string(),
            None => dump.to_string(),
        })
    }

    /// The lines of `/init` that start the heartbeat (in the background; its pid in
    /// `$RNVME_BEAT_PID`). `dump_after_s`: a step running this long gets a state dump.
    pub fn init_lines(&self, dump_after: Duration) -> String {
        format!(
            r#"# Heartbeat: a console line every {every} s with the uptime and the script's step
# ({step_file}: "UPTIME NAME"); a step past {dump} s gets every task's state on the console.
rnvme_state() {{
    echo "{state} begin: $1"
    echo "load: $(cat /proc/loadavg)"
    for t in /proc/[0-9]*/task/[0-9]*; do
        read -r st 2>/dev/null <"$t/stat" || continue
        # After "PID (COMM) ": the state, then the parent (2, kthreadd, for kernel threads).
        set -- ${{st##*) }}
        tid=${{t##*/}}
        [ "$2" = 2 ] || [ "$tid" = 2 ] && continue
        read -r comm 2>/dev/null <"$t/comm"
        wc=$(cat "$t/wchan" 2>/dev/null)
        cmd=$(tr '\000\n' '  ' 2>/dev/null <"$t/cmdline" | cut -c1-100)
        echo "task $tid ($comm) $1 wchan=${{wc:-0}}: $cmd"
        if [ -r "$t/stack" ]; then
            while read -r l; do echo "    $l"; done <"$t/stack"
        fi
    done
    echo "{state} end"
}}
(
    dumped=
    while :; do
        read -r up _ </proc/uptime
        step=
        [ -r {step_file} ] && read -r step <{step_file}
        echo "{beat} $up $step"
        start=${{step%%[. ]*}}
        case "$start" in
        '' | *[!0-9]*) ;;
        *)
            ran=$((${{up%%.*}} - start))
            if [ "$step" != "$dumped" ] && [ "$ran" -ge {dump} ]; then
                dumped=$step
                rnvme_state "step '${{step#* }}' has run $ran s"
            fi
            ;;
        esac
        sleep {every}
    done
) &
export RNVME_BEAT_PID=$!
"#,
            every = BEAT_EVERY_S,
            step_file = STEP_FILE,
            dump = dump_after.as_secs().max(1),
            state = self.state,
            beat = self.beat,
        )
    }
}

/// ` UPTIME [START NAME]` after the beat prefix.
fn parse_beat(rest: &str) -> Option<Beat> {
    let mut words = rest.trim().splitn(3, ' ');
    let uptime: f64 = words.next()?.parse().ok()?;
    let step = match (words.next(), words.next()) {
        (Some(start), Some(name)) => Some((start.parse().ok()?, name.trim().to_string())),
        _ => None,
    };
    Some(Beat { uptime, step })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn m() -> BeatMarkers {
        BeatMarkers::new("t0k")
    }

    #[test]
    fn the_last_complete_beat_is_found() {
        let c = "boot\nRNVME-BEAT-t0k 10.50\n[ 11.0] kernel says\nRNVME-BEAT-t0k 12.51 11.20 r_verify kernel\nRNVME-BEAT-t0k 14.5";
        let b = m().last_beat(c).unwrap();
        assert_eq!(b.uptime, 12.51);
        assert_eq!(b.step, Some((11.20, "r_verify kernel".to_string())));
        assert_eq!(
            b.describe(),
            "at 13 s of uptime, in step 'r_verify kernel' for 1 s"
        );
        let first = m().last_beat("RNVME-BEAT-t0k 10.50\n").unwrap();
        assert_eq!(first.step, None);
        assert_eq!(first.describe(), "at 10 s of uptime, in no named step");
        // Another run's token, or a garbled line, is no beat.
        assert_eq!(m().last_beat("RNVME-BEAT-other 10.0\n"), None);
        assert_eq!(
            m().last_beat("RNVME-BEAT-t0k 9.0\nRNVME-BEAT-t0k x\n")
                .unwrap()
                .uptime,
            9.0
        );
    }

    #[test]
    fn beats_leave_the_console_and_state_dumps_stay() {
        let c = "a\nRNVME-BEAT-t0k 1.0\nb\nRNVME-STATE-t0k begin: x\ntask 1\nRNVME-STATE-t0k end\nRNVME-BEAT-t0k 3.0\n";
        assert_eq!(
            m().without_beats(c),
            "a\nb\nRNVME-STATE-t0k begin: x\ntask 1\nRNVME-STATE-t0k end\n"
        );
        assert_eq!(
            m().last_state(c).unwrap(),
            "RNVME-STATE-t0k begin: x\ntask 1\nRNVME-STATE-t0k end"
        );
        assert_eq!(m().last_state("a\nb\n"), None);
        assert_eq!(m().without_states(&m().without_beats(c)), "a\nb\n");
    }

    /// The heartbeat's shell, run on this host with dash and with busybox (the guest's shell),
    /// the step file pointed elsewhere: it beats, names the step, and dumps the tasks' state
    /// once when the step is old.
    #[test]
    fn the_heartbeat_beats_names_the_step_and_dumps_once() {
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("step");
        let lines = m()
            .init_lines(Duration::from_secs(1))
            .replace(STEP_FILE, &step.to_string_lossy())
            .replace("sleep 2", "sleep 0.2");
        // The step began at uptime 1: long ago, so it is dumped (once).
        std::fs::write(&step, "1.00 hang here\n").unwrap();
        let sh = format!("echo main $$\n{lines}\nsleep 1.5\nkill $RNVME_BEAT_PID\n");
        for shell in [&["sh"][..], &["busybox", "sh"]] {
            let out = Command::new(shell[0])
                .args(&shell[1..])
                .arg("-c")
                .arg(&sh)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let b = m().last_beat(&text).expect(&text);
            assert_eq!(b.step, Some((1.0, "hang here".to_string())), "{text}");
            assert!(b.uptime > 1.0);
            assert!(text.matches("RNVME-BEAT-t0k ").count() >= 3, "{text}");
            assert_eq!(
                text.matches("RNVME-STATE-t0k begin: step 'hang here' has run ")
                    .count(),
                1,
                "{shell:?}: {text}"
            );
            let dump = m().last_state(&text).unwrap();
            assert!(dump.ends_with("RNVME-STATE-t0k end"), "{dump}");
            // The main shell is among the tasks, asleep, its command line on one line.
            let main = text.lines().next().unwrap().strip_prefix("main ").unwrap();
            let line = dump
                .lines()
                .find(|l| l.starts_with(&format!("task {main} (")))
                .unwrap_or_else(|| panic!("{shell:?}: no task {main}: {dump}"));
            assert!(line.contains(") S wchan="), "{line}");
            assert!(line.contains(" -c echo main $$ # Heartbeat"), "{line}");
            assert!(
                !dump.lines().any(|l| l.starts_with("task 2 (")),
                "kernel threads are left out: {dump}"
            );
        }
    }
}
