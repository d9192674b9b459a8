//! Commands that would destroy data or run with a meaningless value refuse before they touch a
//! device or boot a guest: one line on stderr, exit status 2, nothing on stdout.

use std::process::Command;

/// A well-formed PCI address where no controller is (the refusals come before opening one).
const NO_DEVICE: &str = "0000:00:1f.7";

/// Runs rnvme with `args`; asserts a refusal (status 2, nothing on stdout, one clean line on
/// stderr) and returns that line.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
        .args(args)
        .output()
        .expect("run rnvme");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?}: something on stdout");
    assert!(!err.contains("internal error"), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    lines[0].to_string()
}

#[test]
fn trim_and_write_zeroes_need_a_range_or_all() {
    for cmd in ["trim", "write-zeroes"] {
        let line = refused(&[cmd, NO_DEVICE]);
        assert_eq!(
            line,
            format!(
                "rnvme: error: {cmd} needs a range: add --lba L --count C, or --all for the whole namespace"
            )
        );
        let line = refused(&[cmd, NO_DEVICE, "--ns", "1"]);
        assert!(line.contains("needs a range"), "{line}");
        for half in [["--lba", "5"], ["--count", "5"]] {
            let mut args = vec![cmd, NO_DEVICE];
            args.extend_from_slice(&half);
            let line = refused(&args);
            assert_eq!(
                line,
                format!(
                    "rnvme: error: {cmd} needs both --lba and --count (or --all for the whole namespace)"
                ),
                "{args:?}"
            );
        }
        for extra in [
            &["--lba", "0", "--count", "8"][..],
            &["--lba", "0"],
            &["--count", "8"],
        ] {
            let mut args = vec![cmd, NO_DEVICE, "--all"];
            args.extend_from_slice(extra);
            let line = refused(&args);
            assert_eq!(
                line,
                format!(
                    "rnvme: error: {cmd}: --all is the whole namespace; give either --all or --lba and --count, not both"
                ),
                "{args:?}"
            );
        }
    }
}

#[test]
fn trim_with_a_range_or_all_goes_on_to_the_device() {
    // The control: with a range or --all the argument check passes and the command fails on
    // the missing device instead (status 1).
    for args in [
        &["trim", NO_DEVICE, "--all"][..],
        &["write-zeroes", NO_DEVICE, "--lba", "0", "--count", "8"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
            .args(args)
            .output()
            .expect("run rnvme");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no PCI device"), "{args:?}: {err}");
    }
}

/// Runs rnvme with `args` where clap itself refuses a value: status 2 and `want` on stderr.
fn refused_by_clap(args: &[&str], want: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
        .args(args)
        .output()
        .expect("run rnvme");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(!err.contains("internal error"), "{args:?}: {err}");
}

#[test]
fn verify_refuses_zero_and_overlong_values() {
    for (extra, want) in [
        (
            &["--timeout-ms", "0"][..],
            "--timeout-ms must be at least 1 (a command deadline of 0 ms fails every command)",
        ),
        (
            &["--timeout-ms", "18446744073709551615"],
            "--timeout-ms 18446744073709551615 is more than an hour (3600000 ms)",
        ),
        (
            &["--sync-every", "0", "--write", "--count", "8"],
            "--sync-every must be at least 1 LBA",
        ),
        (
            &["--write"],
            "--write overwrites the LBAs it checks: give --count N, or --all for everything \
             from --lba to the end of the namespace",
        ),
        (&["-q", "0"], "--depth (-q) must be at least 1"),
        (&["--threads", "0"], "--threads must be at least 1"),
        (
            &["--count", "0"],
            "nothing to verify: give --count of at least 1",
        ),
    ] {
        let mut args = vec!["verify", NO_DEVICE];
        args.extend_from_slice(extra);
        assert_eq!(refused(&args), format!("rnvme: error: {want}"), "{args:?}");
    }
}

#[test]
fn bench_compare_refuses_zero_seconds_before_booting() {
    assert_eq!(
        refused(&["bench", "compare", "--seconds", "0"]),
        "rnvme: error: --seconds must be at least 1 (fio and rnvme perf measure for whole seconds)"
    );
    refused_by_clap(&["bench", "compare", "--rounds", "0"], "--rounds");
}

#[test]
fn mpage_bench_refuses_zero_and_overflowing_values() {
    for (extra, want) in [
        (&["--depth", "0"][..], "--depth must be at least 1"),
        (&["--rounds", "0"], "--rounds must be at least 1"),
        (&["--mib", "0"], "--mib must be at least 1"),
        (
            &["--mib", "18446744073709551615"],
            "--mib 18446744073709551615 is too large",
        ),
    ] {
        let mut args = vec!["mpage", "bench", NO_DEVICE, "--lba", "0"];
        args.extend_from_slice(extra);
        assert_eq!(refused(&args), format!("rnvme: error: {want}"), "{args:?}");
    }
}

#[test]
fn vm_run_refuses_sizes_that_do_not_fit_and_a_zero_timeout() {
    for size in ["99999999999T", "99999999999G", "8796093022208"] {
        refused_by_clap(
            &["vm", "run", "--ctrl", &format!("size={size}"), "--", "true"],
            &format!("size \"{size}\" is too large: at most 8796093022207 MiB (8 EiB)"),
        );
    }
    assert_eq!(
        refused(&["vm", "run", "--timeout", "0", "--", "true"]),
        "rnvme: error: --timeout must be at least 1 second"
    );
}

#[test]
fn vm_run_refuses_a_kept_image_of_another_size() {
    let dir = std::env::temp_dir().join(format!("rnvme-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("kept.img");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let spec = format!("image={},size=2M", img.display());
    let line = refused(&["vm", "run", "--ctrl", &spec, "--", "true"]);
    let kept = std::fs::read(&img).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        line,
        format!(
            "rnvme: error: invalid guest configuration: controller 0 namespace 1: image {} is \
             1048576 bytes, not the 2 MiB asked for: give size=1M to use it as it is, or give \
             another image",
            img.display()
        )
    );
    assert_eq!(kept, vec![0x5au8; 1 << 20], "the image was changed");
}
