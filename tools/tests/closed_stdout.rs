//! A standard output whose reader has gone (`rnvme list | head -1`) ends the command quietly
//! with status 0: no "internal error", nothing on stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A small MAP.json for `rnvme mpage trace`: 1 KiB blocks on 512-byte LBAs, 40 KiB of file.
const MAP: &str = r#"{"block_size":1024,"lba_size":512,"max_transfer":524288,"file_size":40960,
 "extents":[{"file_block":0,"disk_block":100,"blocks":40,"boundary":false,"uptodate":false}],
 "errors":[],"allocate_from":700}"#;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("rnvme-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rnvme(args: &[&str], sysfs: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rnvme"));
    c.args(args).env("RNVME_SYSFS_ROOT", sysfs);
    c
}

/// Runs the command with its stdout a pipe whose read end is closed before it starts, so
/// that every write to stdout fails with EPIPE.
fn with_closed_stdout(mut c: Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    c.stdout(writer).output().expect("run rnvme")
}

#[test]
fn commands_end_quietly_when_stdout_is_closed() {
    let s = Scratch::new("closed-stdout");
    let map = s.0.join("MAP.json");
    std::fs::write(&map, MAP).unwrap();
    let map = map.to_str().unwrap();
    let sysfs = s.0.join("sys");
    std::fs::create_dir_all(sysfs.join("bus/pci/devices")).unwrap();
    let trace = [
        "mpage", "trace", "--map", map, "--read", "0:4", "--write", "0", "--read", "4:6",
    ];
    for args in [&["list"][..], &["list", "--json"], &trace] {
        // The control: with a reader, each prints something and exits 0.
        let open = rnvme(args, &sysfs).output().expect("run rnvme");
        assert_eq!(
            open.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&open.stderr)
        );
        assert!(!open.stdout.is_empty(), "{args:?} printed nothing");

        let closed = with_closed_stdout(rnvme(args, &sysfs));
        let err = String::from_utf8_lossy(&closed.stderr);
        assert!(!err.contains("internal error"), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
        assert_eq!(closed.status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn an_error_is_still_reported_when_stdout_is_closed() {
    let s = Scratch::new("closed-stdout-error");
    let out = with_closed_stdout(rnvme(
        &[
            "mpage",
            "trace",
            "--map",
            s.0.join("missing.json").to_str().unwrap(),
            "--read",
            "0:1",
        ],
        &s.0,
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read the map file"), "{err}");
}
