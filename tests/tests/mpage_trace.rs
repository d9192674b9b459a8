//! `rnvme mpage trace` on the host (no guest): the command-line contract on a small MAP.json.

use std::path::Path;
use std::process::{Command, Output};

use rnvme_tests::rnvme_binary;
use serde_json::Value;

/// 1 KiB file blocks on 512-byte LBAs; file blocks 0..10 sit at disk blocks 100..110 (LBAs
/// 200..220), so a 4 KiB page is 4 blocks, 8 LBAs.
const MAP: &str = r#"{"block_size":1024,"lba_size":512,"max_transfer":524288,"file_size":10240,
 "extents":[{"file_block":0,"disk_block":100,"blocks":10,"boundary":false,"uptodate":false}],
 "errors":[],"allocate_from":700}"#;

fn trace(map: &Path, ops: &[&str]) -> Output {
    Command::new(rnvme_binary())
        .args(["mpage", "trace", "--map"])
        .arg(map)
        .args(ops)
        .output()
        .expect("run rnvme")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn trace_prints_commands_then_pages() {
    let dir = std::env::temp_dir().join(format!("rnvme-mpage-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let map = dir.join("MAP.json");
    std::fs::write(&map, MAP).unwrap();

    // Read pages 0 and 1 (one contiguous 8 KiB extent: one command), then rewrite page 0.
    let out = trace(&map, &["--read", "0:2", "--write", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = lines(&out);
    assert_eq!(l.len(), 4, "two commands and two pages: {l:?}");
    assert_eq!(l[0]["op"], "read", "{l:?}");
    assert_eq!(
        (&l[0]["slba"], &l[0]["lbas"]),
        (&Value::from(200), &Value::from(16)),
        "{l:?}"
    );
    assert_eq!(l[0]["pages"], serde_json::json!([0, 1]), "{l:?}");
    assert_eq!(l[1]["op"], "write", "{l:?}");
    assert_eq!(
        (&l[1]["slba"], &l[1]["lbas"]),
        (&Value::from(200), &Value::from(8)),
        "{l:?}"
    );
    assert_eq!(l[1]["pages"], serde_json::json!([0]), "{l:?}");
    for (i, p) in l[2..].iter().enumerate() {
        assert_eq!(p["page"], Value::from(i), "{l:?}");
        assert_eq!(p["uptodate"], true, "{l:?}");
        assert_eq!(p["dirty"], false, "written back: {l:?}");
        assert_eq!(p["error"], Value::Null, "{l:?}");
    }

    // The order of operations is the command line's: write first, then read.
    let out = trace(&map, &["--write", "0", "--read", "0:2"]);
    assert!(out.status.success());
    let l = lines(&out);
    assert_eq!(l[0]["op"], "write", "{l:?}");

    // Usage errors: exit 2 with one line naming the problem.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, MAP.replace("\"errors\"", "\"bogus\"")).unwrap();
    let out = trace(&bad, &["--read", "0:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bogus") && err.contains("unknown field"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = trace(&map, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to trace"));

    let out = trace(&map, &["--read", "4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("START:COUNT"));

    // A missing map file is not a usage error of the flags: exit 1.
    let out = trace(&dir.join("missing.json"), &["--read", "0:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the map file"));

    std::fs::remove_dir_all(&dir).unwrap();
}
