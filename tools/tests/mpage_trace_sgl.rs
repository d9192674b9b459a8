//! `rnvme mpage trace --sgl`: the data pointers a device that offers SGLs is given, on the
//! command line; without the flag the lines stay those of a PRP-only device.

use std::process::Command;

use serde_json::{json, Value};

/// 4 KiB blocks on 4 KiB LBAs: the file's 16 pages at LBAs 1000..1016.
const MAP: &str = r#"{"block_size":4096,"lba_size":4096,"file_size":65536,
 "extents":[{"file_block":0,"disk_block":1000,"blocks":16,"boundary":false,"uptodate":false}],
 "errors":[]}"#;

fn trace(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("MAP.json");
    std::fs::write(&map, MAP).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
        .args(["mpage", "trace", "--map"])
        .arg(&map)
        .args(args)
        .output()
        .expect("run rnvme");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[test]
fn sgl_shows_the_descriptors_of_a_scattered_write_and_prps_of_one_page() {
    // Pages dirtied in the order 2, 1, 0 sit in frames that run backwards: one write of three
    // pieces. Then page 9 alone.
    let lines = trace(&["--sgl", "--write", "2,1,0", "--read-page", "9"]);
    assert_eq!(lines.len(), 2 + 4, "{lines:#?}");
    let w = json(&lines[0]);
    assert_eq!(
        (&w["op"], &w["slba"], &w["lbas"], &w["pages"]),
        (&json!("write"), &json!(1000), &json!(3), &json!([0, 1, 2])),
        "{w}"
    );
    assert_eq!(w["dptr"], "sgl", "{w}");
    assert!(w.get("prps").is_none(), "{w}");
    let d = w["descriptors"].as_array().unwrap();
    let types: Vec<&str> = d.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["last_segment", "data", "data", "data"], "{w}");
    assert_eq!(d[0]["len"], 48, "a list of three descriptors: {w}");
    let addrs: Vec<u64> = d[1..]
        .iter()
        .map(|d| {
            assert_eq!(d["len"], 4096, "{w}");
            let a = d["addr"].as_str().unwrap();
            u64::from_str_radix(a.strip_prefix("0x").unwrap(), 16).unwrap()
        })
        .collect();
    assert!(
        addrs[0] == addrs[1] + 4096 && addrs[1] == addrs[2] + 4096,
        "frames of pages 0, 1, 2 run backwards: {w}"
    );
    let r = json(&lines[1]);
    assert_eq!(
        r,
        json!({"op":"read","slba":1009,"lbas":1,"dptr":"prp","prps":1,"pages":[9],
               "fallback":false})
    );
    assert_eq!(json(&lines[2])["page"], 0);

    // Without --sgl: the lines of a PRP-only device, as they always were.
    let lines = trace(&["--write", "2,1,0", "--read-page", "9"]);
    assert_eq!(
        lines[0],
        r#"{"op":"write","slba":1000,"lbas":3,"prps":3,"pages":[0,1,2],"fallback":false}"#
    );
    assert_eq!(
        lines[1],
        r#"{"op":"read","slba":1009,"lbas":1,"prps":1,"pages":[9],"fallback":false}"#
    );
}

#[test]
fn the_help_explains_sgl() {
    let out = Command::new(env!("CARGO_BIN_EXE_rnvme"))
        .args(["mpage", "trace", "--help"])
        .output()
        .expect("run rnvme");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--sgl"), "{help}");
    assert!(help.contains("a one-page command carries PRPs"), "{help}");
}
