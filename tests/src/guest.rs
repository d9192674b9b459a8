//! Running guests for the tests: static binaries, a limit on parallel guests, the script
//! prelude, and failing loudly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

use rnvme_tools::vm::{self, VmConfig, VmOutput};

use crate::steps::Steps;

/// Guests one test binary boots at the same time, whatever `--test-threads` says (each guest
/// keeps about one host core busy under TCG).
pub const MAX_PARALLEL_GUESTS: usize = 2;

/// Where the static `rnvme` goes in the guest (first directory of the guest's `PATH`).
const GUEST_RNVME: &str = "/usr/local/bin/rnvme";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// The statically linked `rnvme`, built once per test binary (release, `target/static`).
pub fn rnvme_binary() -> PathBuf {
    static RNVME: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RNVME
        .get_or_init(|| vm::build_static_rnvme(&workspace_root()).map_err(|e| e.to_string()))
        .clone()
        .unwrap_or_else(|e| panic!("cannot build the static rnvme for the guest: {e}"))
}

/// The fio engine, `librnvme_fio.so`, built once per test binary for the fio installed here
/// (which the guest runs too).
pub fn fio_engine() -> PathBuf {
    static ENGINE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| vm::fio_engine(&workspace_root()).map_err(|e| e.to_string()))
        .clone()
        .unwrap_or_else(|e| panic!("cannot build the fio engine: {e}"))
}

/// The statically linked workspace binary `name` (such as `two_controllers`), built once per
/// test binary.
pub fn test_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, Result<PathBuf, String>>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry(name.to_string())
        .or_insert_with(|| vm::static_binary(&workspace_root(), name).map_err(|e| e.to_string()))
        .clone()
        .unwrap_or_else(|e| panic!("cannot build the static {name} for the guest: {e}"))
}

/// What the guest kernel's RCU watchdog prints when a CPU's timer did not fire.
const LOST_TIMER: &str = "timer wakeup didn't happen";

/// Whether a guest's console shows the kernel's report of a lost timer wake-up.
fn lost_timer_wakeup(console: &str) -> bool {
    console.contains(LOST_TIMER)
}

/// A counting semaphore limiting the guests of this process.
struct Slots {
    busy: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots {
    busy: Mutex::new(0),
    freed: Condvar::new(),
};

/// One of the [`MAX_PARALLEL_GUESTS`] slots, given back on drop (also when a test panics).
struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut busy = SLOTS.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= MAX_PARALLEL_GUESTS {
            busy = SLOTS.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut busy = SLOTS.busy.lock().unwrap_or_else(|e| e.into_inner());
        *busy -= 1;
        SLOTS.freed.notify_one();
    }
}

/// Shell functions every guest script starts with.
///
/// - `step NAME CMD...` runs CMD (a program or one of these functions) and prints its status,
///   stdout, stderr and duration as a block [`Steps`] parses; while it runs, its name is in
///   the runner's step file ([`vm::STEP_FILE`]: the guest's heartbeat reports it, and the
///   state of the guest's tasks is dumped if it runs too long); `record NAME CMD...` runs it
///   silently (for background jobs) and `show NAME` prints the block later. Their files are
///   `/tmp/steps/NAME.{out,err,rc,t}`.
/// - `ctrl_of BDF`: the kernel's name of the controller (`nvme0`), empty if the kernel driver
///   does not have it; `blk BDF NSID`: the namespace's block device; `wait_blk BDF NSID`: waits
///   (at most 30 s) until the kernel driver has created it (at boot or after a rebind), and
///   prints it; `ns_ids BDF`: the namespace ids the kernel driver sees, one per line.
/// - `rnd FILE BYTES`: random data; `same A B`: identical files (size and MD5: busybox `cmp`
///   is slow); `is_zero FILE BYTES`: BYTES zero bytes; `splice_zeros SRC OUT BS HEAD MID`: OUT
///   is SRC with blocks HEAD..HEAD+MID zeroed.
/// - `kwrite DEV FILE OFFSET` and `kread DEV OFFSET BYTES OUT`: O_DIRECT I/O through the kernel
///   driver at byte offsets.
pub const PRELUDE: &str = r#"# rnvme test prelude
mkdir -p /tmp/steps /tmp/d
record() {
    _rec=$1; shift
    read -r _rt0 _ </proc/uptime
    "$@" >"/tmp/steps/$_rec.out" 2>"/tmp/steps/$_rec.err"
    echo $? >"/tmp/steps/$_rec.rc"
    read -r _rt1 _ </proc/uptime
    echo "$_rt0 $_rt1" >"/tmp/steps/$_rec.t"
}
show() {
    if [ -e "/tmp/steps/$1.t" ]; then printf '\n@@TIME %s %s\n' "$1" "$(cat "/tmp/steps/$1.t")"; fi
    printf '\n@@STEP %s %s\n' "$1" "$(cat "/tmp/steps/$1.rc")"
    cat "/tmp/steps/$1.out"
    printf '\n@@STDERR %s\n' "$1"
    cat "/tmp/steps/$1.err"
    printf '\n@@END %s\n' "$1"
}
step() {
    _stp=$1; shift
    read -r _st0 _ </proc/uptime
    echo "$_st0 $_stp" >/run/rnvme-step
    record "$_stp" "$@"
    rm -f /run/rnvme-step
    show "$_stp"
}
ctrl_of() { ls "/sys/bus/pci/devices/$1/nvme" 2>/dev/null | head -n 1; }
blk() {
    for _bd in /sys/bus/pci/devices/$1/nvme/nvme*/nvme*n$2; do
        if [ -e "$_bd/dev" ]; then echo "/dev/${_bd##*/}"; return 0; fi
    done
    return 1
}
wait_blk() {
    _wi=0
    while [ $_wi -lt 600 ]; do
        if _wb=$(blk "$1" "$2") && [ -b "$_wb" ]; then echo "$_wb"; return 0; fi
        sleep 0.05
        _wi=$((_wi + 1))
    done
    echo "the kernel created no block device for namespace $2 of $1 within 30 s" >&2
    return 1
}
ns_ids() {
    for _nd in /sys/bus/pci/devices/$1/nvme/nvme*/nvme*n*; do
        [ -e "$_nd/dev" ] && cat "$_nd/nsid"
    done | sort -n
}
rnd() { head -c "$2" /dev/urandom >"$1" && [ "$(wc -c <"$1")" -eq "$2" ]; }
same() {
    _sa=$(wc -c <"$1") && _sb=$(wc -c <"$2") && [ "$_sa" -eq "$_sb" ] &&
        [ "$(md5sum <"$1")" = "$(md5sum <"$2")" ] && return 0
    ls -l "$1" "$2"
    md5sum "$1" "$2"
    return 1
}
is_zero() {
    _zs=$(wc -c <"$1")
    if [ "$_zs" -ne "$2" ]; then echo "$1 has $_zs bytes, expected $2"; return 1; fi
    if cmp -s -n "$2" "$1" /dev/zero; then return 0; fi
    echo "$1 is not all zeros"
    md5sum "$1"
    return 1
}
splice_zeros() {
    {
        dd if="$1" bs="$3" count="$4" 2>/dev/null
        head -c $(($3 * $5)) /dev/zero
        dd if="$1" bs="$3" skip=$(($4 + $5)) 2>/dev/null
    } >"$2"
}
kwrite() { dd if="$2" of="$1" bs=1M seek="$3" oflag=direct,seek_bytes conv=notrunc 2>&1; }
kread() {
    dd if="$1" of="$4" bs=1M skip="$2" count="$3" iflag=direct,skip_bytes,count_bytes 2>&1 &&
        [ "$(wc -c <"$4")" -eq "$3" ]
}
# end of prelude
"#;

/// A finished guest run whose script exited 0.
#[derive(Debug)]
pub struct GuestRun {
    /// What the runner returned.
    pub output: VmOutput,
    /// The steps the script reported.
    pub steps: Steps,
}

/// Boots a guest with `config`, the static `rnvme` at `/usr/local/bin/rnvme`, the host's
/// nvme-cli, and the static workspace binaries `test_bins` in `/usr/local/bin`; runs
/// [`PRELUDE`] followed by `script`; asserts that the guest ran and the script exited 0
/// (showing the end of its output and of the kernel console otherwise).
///
/// At most [`MAX_PARALLEL_GUESTS`] guests of this process run at a time. Prints the step count
/// and the slowest steps to stderr; with `RNVME_TESTS_SHOW_OUTPUT` set, the whole output too.
pub fn run_guest(mut config: VmConfig, test_bins: &[&str], script: &str) -> GuestRun {
    config.files.push((rnvme_binary(), GUEST_RNVME.to_string()));
    for b in test_bins {
        config
            .files
            .push((test_binary(b), format!("/usr/local/bin/{b}")));
    }
    if !config.host_binaries.iter().any(|b| b == "nvme") {
        config.host_binaries.push("nvme".into());
    }
    let full = format!("{PRELUDE}\n{script}\n");
    let boot = || {
        let _slot = Slot::take();
        vm::run(&config, &full)
    };
    let result = match boot() {
        // The guest kernel itself reported that a halted vCPU's timer never fired: an
        // emulator's lost wake-up (seen under TCG with two guests on two host cores), not
        // anything the script did. Once more, from a fresh boot; a hang of the script's own
        // recurs and fails there.
        Err(vm::VmError::Timeout { console, .. }) if lost_timer_wakeup(&console) => {
            eprintln!(
                "the guest's kernel lost a timer wake-up (\"{LOST_TIMER}\" on its console): booting it again"
            );
            boot()
        }
        other => other,
    };
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            let console = e
                .console_tail(40)
                .unwrap_or_else(|| "(the guest did not start)".into());
            let printed = match &e {
                vm::VmError::Timeout { output, .. }
                | vm::VmError::Stalled { output, .. }
                | vm::VmError::GuestFailed { output, .. } => vm::tail_lines(output, 60),
                _ => String::new(),
            };
            let state = match &e {
                vm::VmError::Timeout {
                    state: Some(state), ..
                } => format!("\n--- the guest's tasks while the step hung ---\n{state}"),
                _ => String::new(),
            };
            panic!(
                "guest run failed: {e}\n--- script output (end) ---\n{printed}{state}\n--- kernel console (end) ---\n{console}"
            );
        }
    };
    assert_eq!(
        output.exit_code,
        0,
        "the guest script exited {}\n--- script output (end) ---\n{}\n--- kernel console (end) ---\n{}",
        output.exit_code,
        vm::tail_lines(&output.output, 60),
        vm::tail_lines(&output.console, 40)
    );
    let steps = Steps::parse(&output.output);
    let mut slowest: Vec<(&str, f64)> = steps
        .names()
        .iter()
        .filter_map(|n| Some((n.as_str(), steps.get(n).seconds?)))
        .collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    let in_steps: f64 = slowest.iter().map(|s| s.1).sum();
    eprintln!(
        "guest: {} steps ({in_steps:.1} s), boot to script {:.1} s, whole run {:.1} s; slowest: {}",
        steps.len(),
        output.boot_to_script.as_secs_f64(),
        output.total.as_secs_f64(),
        slowest
            .iter()
            .take(5)
            .map(|(n, t)| format!("{n} {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if std::env::var_os("RNVME_TESTS_SHOW_OUTPUT").is_some() {
        eprintln!(
            "--- guest output ---\n{}\n--- end of guest output ---",
            output.output
        );
    }
    GuestRun { output, steps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    #[test]
    fn the_prelude_names_each_step_in_the_runners_step_file() {
        assert!(PRELUDE.contains(&format!("echo \"$_st0 $_stp\" >{}\n", vm::STEP_FILE)));
        assert!(PRELUDE.contains(&format!("rm -f {}\n", vm::STEP_FILE)));
    }

    #[test]
    fn slots_never_exceed_the_limit() {
        let inside = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (inside, peak, start) = (inside.clone(), peak.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..50 {
                        let _slot = Slot::take();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            (1..=MAX_PARALLEL_GUESTS).contains(&peak),
            "{peak} holders at once"
        );
        assert_eq!(*SLOTS.busy.lock().unwrap(), 0);
    }

    #[test]
    fn prelude_is_valid_shell() {
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(PRELUDE)
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn prelude_helpers_work_on_the_host() {
        let dir = tempfile_dir();
        let script = format!(
            "{PRELUDE}\ncd {d}\n\
             step gen rnd {d}/a 5000\n\
             step copy cp {d}/a {d}/b\n\
             step same same {d}/a {d}/b\n\
             step differ same {d}/a /etc/passwd\n\
             step zeros_ok sh -c 'head -c 4096 /dev/zero > {d}/z'\n\
             step is_zero is_zero {d}/z 4096\n\
             step not_zero is_zero {d}/a 5000\n\
             step wrong_size is_zero {d}/z 512\n\
             step splice splice_zeros {d}/a {d}/s 1000 1 2\n\
             step splice_head sh -c 'cmp -n 1000 {d}/a {d}/s'\n\
             step splice_mid sh -c 'dd if={d}/s bs=1000 skip=1 count=2 2>/dev/null | cmp -s -n 2000 - /dev/zero'\n\
             step splice_tail sh -c 'cmp {d}/a {d}/s 3000 3000'\n\
             step fails false\n",
            d = dir.display()
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let steps = Steps::parse(&stdout);
        assert!(
            !steps.is_empty(),
            "no steps: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for ok in [
            "gen",
            "copy",
            "same",
            "is_zero",
            "splice",
            "splice_head",
            "splice_mid",
            "splice_tail",
        ] {
            steps.ok(ok);
        }
        for bad in ["differ", "not_zero", "wrong_size", "fails"] {
            assert_ne!(steps.get(bad).rc, 0, "{}", steps.get(bad).describe());
        }
        assert_eq!(std::fs::metadata(dir.join("s")).unwrap().len(), 5000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_kernels_report_of_a_lost_timer_wake_up_boots_a_guest_again() {
        let stall = "[  105.404878] rcu: rcu_preempt kthread timer wakeup didn't happen for 15754 jiffies! g1881 f0x0 RCU_GP_WAIT_FQS(5) ->state=0x402\n[  105.404878] rcu: \tPossible timer handling issue on cpu=1 timer-softirq=529";
        assert!(lost_timer_wakeup(stall));
        // A hang of anything else (a task blocked, a driver's timeout) is not retried.
        for other in [
            "INFO: task rnvme:231 blocked for more than 120 seconds.",
            "nvme nvme0: I/O 12 QID 1 timeout, aborting",
            "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
            "",
        ] {
            assert!(!lost_timer_wakeup(other), "{other}");
        }
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rnvme-tests-prelude-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
