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
