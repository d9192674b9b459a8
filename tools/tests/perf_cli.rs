//! `rnvme perf` refuses arguments that cannot work before it touches a device, with a clear
//! message and exit status 2.

use std::process::Command;

fn perf(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
        .arg("perf")
        .args(args)
        .output()
        .expect("run rnvme");
    assert!(out.stdout.is_empty(), "nothing on stdout for a refused run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refused_arguments_exit_with_status_2() {
    let base = ["0000:00:1f.7"];
    for (extra, want) in [
        (
            &["-t", "0", "-q", "1", "-o", "4k", "-w", "read"][..],
            "the run time (-t) must be above zero",
        ),
        (
            &["-t", "0.0000000001", "-q", "1", "-o", "4k", "-w", "read"],
            "the run time (-t) must be above zero",
        ),
        (
            &["-q", "0", "-o", "4096", "-w", "read"],
            "'0' for '--depth <DEPTH>': 0 is not in 1..=65536",
        ),
        (
            &["-q", "4294967295", "-o", "4294966784", "-w", "read"],
            "4294967295 is not in 1..=65536",
        ),
        (
            &["-q", "1", "-o", "1000", "-w", "read"],
            "not a positive multiple of 512",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "randread", "--fua"],
            "--fua applies to writes",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "read", "--zipf", "1.2"],
            "--zipf applies to random",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "randread", "-M", "70"],
            "-M (read share)",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "sideways"],
            "unknown workload",
        ),
        (&["-q", "1", "-o", "4k"], "--workload"),
        (
            &["-q", "1", "-o", "4k", "-w", "read", "--reactor-cpu", "0"],
            "--reactor",
        ),
        (
            &[
                "-q",
                "1",
                "-o",
                "4k",
                "-w",
                "read",
                "--reactor",
                "--reactor-cpu",
                "x",
            ],
            "--reactor-cpu",
        ),
    ] {
        let mut args = base.to_vec();
        if !extra.contains(&"-t") {
            args.extend_from_slice(&["-t", "1"]);
        }
        args.extend_from_slice(extra);
        let (code, err) = perf(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
