//! The engine loaded by the fio installed here (the one it was built for), with no device:
//! fio finds it, lists its options, and every refusal before any I/O is one line and a failed
//! fio. (I/O through the engine is proven in a guest: fio_guest.rs.)

use std::path::PathBuf;
use std::process::Command;

/// `librnvme_fio.so`, built for the fio installed here by a cargo of its own (`target/fio`):
/// `cargo test` builds the crate's rlib for its tests, not the cdylib fio loads.
fn engine() -> PathBuf {
    let so = rnvme_tests::fio_engine();
    assert!(so.is_file(), "{} was not built", so.display());
    so
}

fn fio(args: &[&str]) -> (i32, String) {
    let out = Command::new("fio")
        .args(args)
        .output()
        .expect("fio is installed (the engine is built against its source)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A job that stops before any I/O: the engine's one line, fio's failure.
fn refused(ioengine: &str, extra: &[&str], filename: &str, line: &str) {
    let name = format!("--filename={filename}");
    let engine = format!("--ioengine={ioengine}");
    let mut args = vec![
        "--name=t",
        engine.as_str(),
        name.as_str(),
        "--rw=read",
        "--bs=4k",
        "--size=1m",
    ];
    args.extend_from_slice(extra);
    let (rc, text) = fio(&args);
    assert_ne!(rc, 0, "fio succeeded:\n{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("rnvme: ")).collect();
    assert_eq!(lines.len(), 1, "one line of the engine expected:\n{text}");
    assert!(lines[0].contains(line), "{:?} lacks {line:?}", lines[0]);
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn fio_loads_the_engine_and_lists_its_options() {
    let so = engine();
    let (rc, text) = fio(&[&format!("--enghelp={}", so.display())]);
    assert_eq!(rc, 0, "{text}");
    for opt in ["rnvme_dptr", "rnvme_hugepages", "rnvme_fua"] {
        assert!(text.contains(opt), "{opt} not listed:\n{text}");
    }
    let (rc, text) = fio(&[&format!("--enghelp={},rnvme_dptr", so.display())]);
    assert_eq!(rc, 0, "{text}");
    for v in ["auto", "prp", "sgl"] {
        assert!(text.contains(v), "{v} not listed:\n{text}");
    }
}

#[test]
fn bad_jobs_are_refused_with_one_line_in_both_spellings_of_the_engine() {
    let so = engine().display().to_string();
    for ioengine in [format!("external:{so}"), so.clone()] {
        refused(
            &ioengine,
            &["--thread=1"],
            "0000.7f.00.0/1",
            "no PCI device 0000:7f:00.0",
        );
        refused(
            &ioengine,
            &["--thread=1"],
            "trtype=PCIe traddr=0000.7f.00.0 ns=1",
            "no PCI device 0000:7f:00.0",
        );
        refused(&ioengine, &[], "0000.7f.00.0/1", "set thread=1");
        refused(
            &ioengine,
            &["--thread=1"],
            "trtype=TCP traddr=0000.7f.00.0 ns=1",
            "only trtype=PCIe",
        );
        refused(
            &ioengine,
            &["--thread=1"],
            "0000.7f.00.0/0",
            "not a namespace ID",
        );
        refused(
            &ioengine,
            &["--thread=1"],
            "/dev/nvme0n1",
            "not a PCI address",
        );
    }
}
