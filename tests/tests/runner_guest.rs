//! The VM runner's own guard against an emulator that stops: the guest's heartbeat.
//!
//! - A guest whose heartbeat stops while its script runs is taken for stopped (QEMU's TCG
//!   losing a halted vCPU's timer wake-up): booted once more, then reported as
//!   [`VmError::Stalled`] with its last beat, long before the run's time limit.
//! - A guest whose script hangs keeps beating: the time limit ends it with
//!   [`VmError::Timeout`], which says which step hung and for how long, and carries the state
//!   of the guest's tasks dumped while it hung (the sleeping `sleep` and its kernel stack); the
//!   console it returns holds neither beats nor the dump.

use std::time::Duration;

use rnvme_tests::PRELUDE;
use rnvme_tools::vm::{self, VmConfig, VmError};

#[test]
fn a_guest_whose_heartbeat_stops_is_booted_again_then_reported_stalled() {
    let config = VmConfig {
        stall_limit: Duration::from_secs(10),
        timeout: Duration::from_secs(400),
        ..VmConfig::default()
    };
    // The heartbeat stopped as a stopped guest's would, the script left running.
    let script = "kill -STOP $RNVME_BEAT_PID && echo heartbeat stopped\nsleep 1000\n";
    match vm::run(&config, script) {
        Err(VmError::Stalled {
            limit,
            attempts,
            last_beat,
            output,
            console,
        }) => {
            assert_eq!(limit, config.stall_limit);
            assert_eq!(attempts, 2, "booted once more first");
            assert!(
                last_beat.starts_with("at ")
                    && last_beat.ends_with(" s of uptime, in no named step"),
                "{last_beat}"
            );
            assert!(output.contains("heartbeat stopped"), "{output}");
            assert!(!console.contains("RNVME-BEAT-"), "{console}");
        }
        other => panic!("expected a stalled guest, got {other:?}"),
    }
}

#[test]
fn a_hanging_step_is_named_and_the_guests_tasks_are_dumped_while_it_hangs() {
    let config = VmConfig {
        state_dump_after: Duration::from_secs(5),
        // Room for a slow boot: the dump comes 5 s into the step, the error at the limit.
        timeout: Duration::from_secs(75),
        ..VmConfig::default()
    };
    let script = format!("{PRELUDE}\nstep quick true\nstep hang sleep 1000\n");
    match vm::run(&config, &script) {
        Err(VmError::Timeout {
            guest,
            state,
            console,
            output,
            ..
        }) => {
            assert!(
                guest.starts_with("its last heartbeat ") && guest.contains(", in step 'hang' for "),
                "{guest}"
            );
            assert!(output.contains("@@END quick"), "{output}");
            let state = state.expect("a state dump");
            assert!(state.contains("begin: step 'hang' has run "), "{state}");
            // The hung step's process, asleep, with the kernel stack it sleeps in.
            let lines: Vec<&str> = state.lines().collect();
            let i = lines
                .iter()
                .position(|l| {
                    l.starts_with("task ")
                        && l.contains(" (sleep) S wchan=")
                        && l.ends_with(": sleep 1000 ")
                })
                .unwrap_or_else(|| panic!("no sleeping `sleep 1000` task: {state}"));
            assert!(
                lines[i + 1..]
                    .iter()
                    .take_while(|l| l.starts_with("    "))
                    .any(|l| l.contains("nanosleep")),
                "no nanosleep in its stack: {state}"
            );
            assert!(!console.contains("RNVME-BEAT-"), "{console}");
            assert!(!console.contains("RNVME-STATE-"), "{console}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}
