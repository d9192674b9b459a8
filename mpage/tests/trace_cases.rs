//! The table of the mpage issue, through the trace contract: parse the JSON lines the
//! `rnvme mpage trace` command prints and check them, plus the map-call order, the page bytes
//! and the disk where the lines cannot show it.

use std::collections::BTreeMap;

use rnvme_mpage::{
    pattern_byte, run_trace, trace, MapSpec, TraceEvent, TraceOp, TraceReport, WRITE_SEED,
};
use serde_json::{json, Value};

struct Out {
    cmds: Vec<Value>,
    pages: BTreeMap<u64, Value>,
    report: TraceReport,
}

/// One extent: (file_block, disk_block, blocks, boundary).
type Ext = (u64, u64, u64, bool);

fn map_json(
    bs: u32,
    lba: u32,
    max: Option<u32>,
    size: u64,
    extents: &[Ext],
    errors: &[u64],
    alloc: Option<u64>,
) -> String {
    let ex: Vec<Value> = extents
        .iter()
        .map(|&(f, d, n, b)| json!({"file_block": f, "disk_block": d, "blocks": n, "boundary": b, "uptodate": false}))
        .collect();
    let mut v = json!({"block_size": bs, "lba_size": lba, "file_size": size, "extents": ex, "errors": errors});
    if let Some(m) = max {
        v["max_transfer"] = json!(m);
    }
    if let Some(a) = alloc {
        v["allocate_from"] = json!(a);
    }
    v.to_string()
}

fn run(map: &str, ops: &[TraceOp]) -> Out {
    let report = run_trace(&MapSpec::from_json(map).unwrap(), ops).unwrap();
    let lines = report.json_lines();
    assert_eq!(
        lines,
        trace(map, ops).unwrap(),
        "trace() prints what run_trace reports"
    );
    let mut cmds = Vec::new();
    let mut pages = BTreeMap::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        if v.get("op").is_some() {
            assert!(pages.is_empty(), "command lines come before page lines");
            cmds.push(v);
        } else {
            pages.insert(v["page"].as_u64().unwrap(), v);
        }
    }
    Out {
        cmds,
        pages,
        report,
    }
}

fn read(start: u64, count: u64) -> TraceOp {
    TraceOp::Read { start, count }
}

/// (op, slba, lbas, pages, fallback) of every command.
fn shape(o: &Out) -> Vec<(String, u64, u64, Vec<u64>, bool)> {
    o.cmds
        .iter()
        .map(|c| {
            let pages = c["pages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .collect();
            (
                c["op"].as_str().unwrap().to_string(),
                c["slba"].as_u64().unwrap(),
                c["lbas"].as_u64().unwrap(),
                pages,
                c["fallback"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn cmd(
    op: &str,
    slba: u64,
    lbas: u64,
    pages: &[u64],
    fallback: bool,
) -> (String, u64, u64, Vec<u64>, bool) {
    (op.to_string(), slba, lbas, pages.to_vec(), fallback)
}

fn prps(o: &Out) -> Vec<u64> {
    o.cmds.iter().map(|c| c["prps"].as_u64().unwrap()).collect()
}

fn map_calls(o: &Out) -> Vec<(u64, bool)> {
    o.report
        .events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Map {
                file_block, create, ..
            } => Some((*file_block, *create)),
            TraceEvent::Command(_) => None,
        })
        .collect()
}

fn page_is(o: &Out, p: u64, uptodate: bool, dirty: bool, zeroed_from: Option<u64>, error: bool) {
    let v = &o.pages[&p];
    assert_eq!(v["uptodate"], json!(uptodate), "page {p} uptodate: {v}");
    assert_eq!(v["dirty"], json!(dirty), "page {p} dirty: {v}");
    assert_eq!(
        v["zeroed_from"],
        json!(zeroed_from),
        "page {p} zeroed_from: {v}"
    );
    assert_eq!(!v["error"].is_null(), error, "page {p} error: {v}");
}

/// Disk pattern bytes at a byte address.
fn disk(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(0, offset + i))
        .collect()
}

fn written(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(WRITE_SEED, offset + i))
        .collect()
}

const K4: u32 = 4096;

#[test]
fn case01_contiguous_file_is_one_read_and_one_map_call() {
    let o = run(
        &map_json(K4, K4, None, 16 * 4096, &[(0, 1000, 16, false)], &[], None),
        &[read(0, 16)],
    );
    assert_eq!(
        shape(&o),
        vec![cmd("read", 1000, 16, &(0..16).collect::<Vec<_>>(), false)]
    );
    assert_eq!(prps(&o), vec![16]);
    assert_eq!(map_calls(&o), vec![(0, false)]);
    let first = r#"{"op":"read","slba":1000,"lbas":16,"prps":16,"pages":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15],"fallback":false}"#;
    let lines = o.report.json_lines();
    assert_eq!(lines[0], first);
    assert_eq!(
        lines[1],
        r#"{"page":0,"uptodate":true,"dirty":false,"zeroed_from":null,"mapped_to_disk":true,"error":null}"#
    );
    for p in 0..16 {
        assert_eq!(
            o.report.page_data[&p],
            disk((1000 + p) * 4096, 4096),
            "page {p}"
        );
    }
}

#[test]
fn case02_max_transfer_splits_a_run() {
    let o = run(
        &map_json(
            K4,
            K4,
            Some(128 << 10),
            64 * 4096,
            &[(0, 1000, 64, false)],
            &[],
            None,
        ),
        &[read(0, 64)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 1000, 32, &(0..32).collect::<Vec<_>>(), false),
            cmd("read", 1032, 32, &(32..64).collect::<Vec<_>>(), false)
        ]
    );
    assert_eq!(prps(&o), vec![32, 32]);
}

#[test]
fn case03_two_extents_two_reads() {
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            8 * 4096,
            &[(0, 100, 4, false), (4, 200, 4, false)],
            &[],
            None,
        ),
        &[read(0, 8)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 100, 4, &[0, 1, 2, 3], false),
            cmd("read", 200, 4, &[4, 5, 6, 7], false)
        ]
    );
}

#[test]
fn case04_boundary_sends_before_the_next_block_is_mapped() {
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            16 * 4096,
            &[(0, 1000, 12, true), (12, 1012, 4, false)],
            &[],
            None,
        ),
        &[read(0, 16)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 1000, 12, &(0..12).collect::<Vec<_>>(), false),
            cmd("read", 1012, 4, &[12, 13, 14, 15], false)
        ]
    );
    // The events: map(0), read(1000,12), map(12), read(1012,4).
    let order: Vec<String> = o
        .report
        .events
        .iter()
        .map(|e| match e {
            TraceEvent::Map { file_block, .. } => format!("map {file_block}"),
            TraceEvent::Command(i) => format!("cmd {i}"),
        })
        .collect();
    assert_eq!(order, ["map 0", "cmd 0", "map 12", "cmd 1"]);
}

#[test]
fn case05_hole_page_inside_a_run() {
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            3 * 4096,
            &[(0, 100, 1, false), (2, 101, 1, false)],
            &[],
            None,
        ),
        &[read(0, 3)],
    );
    assert_eq!(shape(&o), vec![cmd("read", 100, 2, &[0, 2], false)]);
    assert_eq!(prps(&o), vec![2]);
    page_is(&o, 1, true, false, Some(0), false);
    assert_eq!(o.report.page_data[&1], vec![0; 4096]);
    assert_eq!(o.report.page_data[&2], disk(101 * 4096, 4096));
    let rec = &o.report.commands[0];
    assert_eq!(rec.data.len(), 2);
    assert_eq!(
        rec.data[1].0, rec.segments[1].iova,
        "PRP2 points straight at page 2's frame"
    );
}

#[test]
fn case06_no_extents_no_commands() {
    let o = run(
        &map_json(K4, K4, None, 4 * 4096, &[], &[], None),
        &[read(0, 4)],
    );
    assert!(o.cmds.is_empty());
    for p in 0..4 {
        page_is(&o, p, true, false, Some(0), false);
        assert_eq!(o.pages[&p]["mapped_to_disk"], json!(false));
        assert_eq!(o.report.page_data[&p], vec![0; 4096]);
    }
}

#[test]
fn case07_pages_past_the_end_need_no_map_call() {
    let o = run(
        &map_json(K4, K4, None, 8192, &[(0, 500, 2, false)], &[], None),
        &[read(0, 4)],
    );
    assert_eq!(shape(&o), vec![cmd("read", 500, 2, &[0, 1], false)]);
    // Readahead stops at the page holding the last byte (as the kernel's does): the pages
    // past it are not the file's, and are not made up as zeros either.
    assert!(!o.pages.contains_key(&2) && !o.pages.contains_key(&3));
    assert!(
        map_calls(&o).iter().all(|&(b, _)| b < 2),
        "{:?}",
        map_calls(&o)
    );
}

#[test]
fn case08_a_mapping_error_hits_only_its_page() {
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            4 * 4096,
            &[(0, 100, 2, false), (3, 103, 1, false)],
            &[2],
            None,
        ),
        &[read(0, 4)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 100, 2, &[0, 1], false),
            cmd("read", 103, 1, &[3], false)
        ]
    );
    page_is(&o, 2, false, false, None, true);
    assert!(o.pages[&2]["error"]
        .as_str()
        .unwrap()
        .contains("file block 2"));
    for p in [0, 1, 3] {
        page_is(&o, p, true, false, None, false);
    }
}

#[test]
fn case09_small_blocks_contiguous() {
    let o = run(
        &map_json(
            1024,
            512,
            None,
            16 * 1024,
            &[(0, 800, 16, false)],
            &[],
            None,
        ),
        &[read(0, 4)],
    );
    assert_eq!(shape(&o), vec![cmd("read", 1600, 32, &[0, 1, 2, 3], false)]);
    assert_eq!(prps(&o), vec![4]);
    assert_eq!(o.report.page_data[&3], disk(800 * 1024 + 3 * 4096, 4096));
}

#[test]
fn case10_discontiguous_blocks_in_a_page_go_block_by_block() {
    let o = run(
        &map_json(
            1024,
            512,
            None,
            8 * 1024,
            &[(0, 100, 2, false), (2, 300, 2, false), (4, 302, 4, false)],
            &[],
            None,
        ),
        &[read(0, 2)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 200, 2, &[0], true),
            cmd("read", 202, 2, &[0], true),
            cmd("read", 600, 2, &[0], true),
            cmd("read", 602, 2, &[0], true),
            cmd("read", 604, 8, &[1], false),
        ]
    );
    let frame0 = o.report.commands[0].segments[0].iova.0;
    let offsets: Vec<u64> = o.report.commands[..4]
        .iter()
        .map(|c| c.segments[0].iova.0 - frame0)
        .collect();
    assert_eq!(offsets, [0, 1024, 2048, 3072]);
    let mut want = disk(100 * 1024, 2048);
    want.extend(disk(300 * 1024, 2048));
    assert_eq!(o.report.page_data[&0], want);
    page_is(&o, 0, true, false, None, false);
}

#[test]
fn case11_hole_at_the_end_of_a_page_sends_the_command() {
    let o = run(
        &map_json(
            1024,
            512,
            None,
            8 * 1024,
            &[(0, 100, 2, false), (4, 102, 4, false)],
            &[],
            None,
        ),
        &[read(0, 2)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 200, 4, &[0], false),
            cmd("read", 204, 8, &[1], false)
        ]
    );
    page_is(&o, 0, true, false, Some(2048), false);
    assert_eq!(o.pages[&0]["mapped_to_disk"], json!(false));
    assert!(o.report.page_data[&0][2048..].iter().all(|&b| b == 0));
    // Sent at once: before block 4 was mapped.
    let before = o.report.map_calls_before_commands();
    assert_eq!(
        map_calls(&o)[..before[0]].iter().map(|c| c.0).max(),
        Some(2)
    );
}

#[test]
fn case12_hole_then_data_is_confused() {
    let o = run(
        &map_json(1024, 512, None, 4 * 1024, &[(1, 101, 3, false)], &[], None),
        &[read(0, 1)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("read", 202, 2, &[0], true),
            cmd("read", 204, 2, &[0], true),
            cmd("read", 206, 2, &[0], true)
        ]
    );
    let data = &o.report.page_data[&0];
    assert_eq!(&data[..1024], &[0; 1024][..]);
    assert_eq!(&data[1024..], &disk(101 * 1024, 3072)[..]);
    page_is(&o, 0, true, false, None, false);
}

#[test]
fn case13_end_of_file_inside_a_page() {
    let o = run(
        &map_json(1024, 512, None, 5120, &[(0, 100, 5, false)], &[], None),
        &[read(0, 2)],
    );
    assert_eq!(shape(&o), vec![cmd("read", 200, 10, &[0, 1], false)]);
    page_is(&o, 1, true, false, Some(1024), false);
    let p1 = &o.report.page_data[&1];
    assert_eq!(&p1[..1024], &disk(104 * 1024, 1024)[..]);
    assert!(p1[1024..].iter().all(|&b| b == 0));
}

#[test]
fn case14_allocating_writes_coalesce() {
    let o = run(
        &map_json(K4, K4, None, 32 << 10, &[], &[], Some(700)),
        &[TraceOp::WritePages((0..8).collect())],
    );
    assert_eq!(
        shape(&o),
        vec![cmd("write", 700, 8, &(0..8).collect::<Vec<_>>(), false)]
    );
    for p in 0..8 {
        page_is(&o, p, true, false, None, false);
        assert_eq!(
            o.report.device.read_bytes((700 + p) * 4096, 4096),
            written(p * 4096, 4096)
        );
    }
}

#[test]
fn case15_pages_join_when_adjacent_on_disk() {
    let dirty = vec![0, 1, 2, 5, 6];
    let o = run(
        &map_json(K4, K4, None, 32 << 10, &[], &[], Some(700)),
        &[TraceOp::WritePages(dirty.clone())],
    );
    assert_eq!(shape(&o), vec![cmd("write", 700, 5, &dirty, false)]);
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            32 << 10,
            &[(0, 700, 8, false)],
            &[],
            Some(900),
        ),
        &[TraceOp::WritePages(dirty)],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("write", 700, 3, &[0, 1, 2], false),
            cmd("write", 705, 2, &[5, 6], false)
        ]
    );
    assert_eq!(
        o.report.device.read_bytes(706 * 4096, 4096),
        written(6 * 4096, 4096)
    );
    assert_eq!(
        o.report.device.read_bytes(703 * 4096, 4096),
        disk(703 * 4096, 4096),
        "clean pages not written"
    );
}

#[test]
fn case16_page_straddling_the_end_is_zeroed_before_writing() {
    let o = run(
        &map_json(K4, K4, None, 10000, &[], &[], Some(700)),
        &[TraceOp::WritePages(vec![0, 1, 2])],
    );
    assert_eq!(shape(&o), vec![cmd("write", 700, 3, &[0, 1, 2], false)]);
    page_is(&o, 2, true, false, Some(1808), false);
    let tail = o.report.device.read_bytes(702 * 4096, 4096);
    assert_eq!(&tail[..1808], &written(8192, 1808)[..]);
    assert!(tail[1808..].iter().all(|&b| b == 0));
}

#[test]
fn case17_pages_past_the_end_are_not_written_or_allocated() {
    let o = run(
        &map_json(K4, K4, None, 8192, &[], &[], Some(700)),
        &[TraceOp::WritePages(vec![0, 1, 2, 3])],
    );
    assert_eq!(shape(&o), vec![cmd("write", 700, 2, &[0, 1], false)]);
    assert_eq!(map_calls(&o), vec![(0, true), (1, true)]);
    page_is(&o, 3, true, false, Some(0), false);
}

#[test]
fn case18_discontiguous_page_written_block_by_block() {
    let o = run(
        &map_json(
            1024,
            512,
            None,
            4096,
            &[(0, 100, 2, false), (2, 300, 2, false)],
            &[],
            None,
        ),
        &[TraceOp::WritePages(vec![0])],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("write", 200, 2, &[0], true),
            cmd("write", 202, 2, &[0], true),
            cmd("write", 600, 2, &[0], true),
            cmd("write", 602, 2, &[0], true),
        ]
    );
    page_is(&o, 0, true, false, None, false);
    assert_eq!(
        o.report.device.read_bytes(300 * 1024, 2048),
        written(2048, 2048)
    );
}

#[test]
fn case19_boundary_ends_a_write() {
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            32 << 10,
            &[(0, 700, 4, true), (4, 704, 4, false)],
            &[],
            None,
        ),
        &[TraceOp::WritePages((0..8).collect())],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("write", 700, 4, &[0, 1, 2, 3], false),
            cmd("write", 704, 4, &[4, 5, 6, 7], false)
        ]
    );
}

#[test]
fn case20_prp_shapes() {
    // 2 MiB contiguous, no max transfer: one command, PRP1 + 511 list entries.
    let o = run(
        &map_json(K4, K4, None, 2 << 20, &[(0, 1000, 512, false)], &[], None),
        &[read(0, 512)],
    );
    assert_eq!(
        shape(&o),
        vec![cmd("read", 1000, 512, &(0..512).collect::<Vec<_>>(), false)]
    );
    assert_eq!(prps(&o), vec![512]);
    assert_eq!(o.report.commands[0].list_pages, 1);
    // 4 MiB: the list chains to a second list page, still one command.
    let o = run(
        &map_json(K4, K4, None, 4 << 20, &[(0, 1000, 1024, false)], &[], None),
        &[read(0, 1024)],
    );
    assert_eq!(shape(&o).len(), 1);
    assert_eq!(prps(&o), vec![1024]);
    assert_eq!(o.report.commands[0].list_pages, 2);
    assert_eq!(o.report.page_data[&1023], disk((1000 + 1023) * 4096, 4096));
    // Frames not adjacent in the pool (a hole page took the frame between): still one command.
    let o = run(
        &map_json(
            K4,
            K4,
            None,
            9 * 4096,
            &[(0, 100, 4, false), (5, 104, 4, false)],
            &[],
            None,
        ),
        &[read(0, 9)],
    );
    assert_eq!(
        shape(&o),
        vec![cmd("read", 100, 8, &[0, 1, 2, 3, 5, 6, 7, 8], false)]
    );
    // Frames that follow one another make one segment: two here.
    let segs = &o.report.commands[0].segments;
    assert_eq!(segs.len(), 2, "{segs:?}");
    assert_eq!((segs[0].len, segs[1].len), (4 * 4096, 4 * 4096));
    assert_eq!(
        segs[1].iova.0 - segs[0].iova.0,
        5 * 4096,
        "page 4's frame lies between"
    );
    for p in [0u64, 3, 5, 8] {
        let d = if p < 4 { 100 + p } else { 99 + p };
        assert_eq!(o.report.page_data[&p], disk(d * 4096, 4096), "page {p}");
    }
}

#[test]
fn read_page_and_write_blocks_ops() {
    // read-page maps only that page's blocks.
    let o = run(
        &map_json(
            1024,
            512,
            None,
            16 * 1024,
            &[(0, 100, 16, false)],
            &[],
            None,
        ),
        &[TraceOp::ReadPage(2)],
    );
    assert_eq!(shape(&o), vec![cmd("read", 216, 8, &[2], false)]);
    assert_eq!(map_calls(&o), vec![(8, false)]);
    // Single dirty blocks: just those blocks are written, the page keeps per-block state.
    let o = run(
        &map_json(
            1024,
            512,
            None,
            16 * 1024,
            &[(0, 100, 16, false)],
            &[],
            None,
        ),
        &[TraceOp::WriteBlocks(vec![1, 2, 9])],
    );
    assert_eq!(
        shape(&o),
        vec![
            cmd("write", 202, 2, &[0], true),
            cmd("write", 204, 2, &[0], true),
            cmd("write", 218, 2, &[2], true)
        ]
    );
    page_is(&o, 0, false, false, None, false);
    assert_eq!(
        o.report.device.read_bytes(101 * 1024, 2048),
        written(1024, 2048)
    );
    assert_eq!(
        o.report.device.read_bytes(100 * 1024, 1024),
        disk(100 * 1024, 1024),
        "block 0 untouched"
    );
    // All blocks of a page dirty: the page goes the fast way.
    let o = run(
        &map_json(
            1024,
            512,
            None,
            16 * 1024,
            &[(0, 100, 16, false)],
            &[],
            None,
        ),
        &[TraceOp::WriteBlocks(vec![4, 5, 6, 7])],
    );
    assert_eq!(shape(&o), vec![cmd("write", 208, 8, &[1], false)]);
}
