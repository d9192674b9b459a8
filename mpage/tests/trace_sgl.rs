//! The trace on a device that offers SGLs (`TraceOptions::sgl`, `rnvme mpage trace --sgl`): the
//! data pointer each command carries, through the JSON lines, and the same cache behaviour and
//! the same data as on the default device, which takes PRPs only.

use rnvme_mpage::{
    pattern_byte, run_trace_with, trace, trace_with, DataPointer, MapSpec, SglEntry, TraceOp,
    TraceOptions, TraceReport, WRITE_SEED,
};
use serde_json::{json, Value};

const SGL: TraceOptions = TraceOptions { sgl: true };
const PRP: TraceOptions = TraceOptions { sgl: false };

/// A file of `blocks` blocks of `bs` bytes on LBAs of `lba` bytes, in the given extents
/// (file_block, disk_block, blocks).
fn map_json(bs: u32, lba: u32, size: u64, extents: &[(u64, u64, u64)]) -> String {
    let ex: Vec<Value> = extents
        .iter()
        .map(|&(f, d, n)| {
            json!({"file_block": f, "disk_block": d, "blocks": n, "boundary": false,
                   "uptodate": false})
        })
        .collect();
    json!({"block_size": bs, "lba_size": lba, "file_size": size, "extents": ex, "errors": []})
        .to_string()
}

fn run(map: &str, ops: &[TraceOp], options: TraceOptions) -> TraceReport {
    let report = run_trace_with(&MapSpec::from_json(map).unwrap(), ops, options).unwrap();
    assert_eq!(
        report.json_lines(),
        trace_with(map, ops, options).unwrap(),
        "trace_with() prints what run_trace_with reports"
    );
    report
}

fn lines(r: &TraceReport) -> Vec<Value> {
    r.json_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn written(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(WRITE_SEED, offset + i))
        .collect()
}

fn disk(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(0, offset + i))
        .collect()
}

/// 16 pages of 4 KiB blocks on 4 KiB LBAs, at LBA 1000 on.
fn contiguous_16() -> String {
    map_json(4096, 4096, 16 * 4096, &[(0, 1000, 16)])
}

#[test]
fn a_write_of_three_scattered_pages_carries_three_data_blocks_in_one_list() {
    // Pages dirtied 2, 1, 0 take frames in that order: written back as one command for
    // pages 0, 1, 2 whose frames run backwards, three pieces.
    let map = contiguous_16();
    let ops = [TraceOp::WritePages(vec![2, 1, 0])];
    let r = run(&map, &ops, SGL);
    assert_eq!(r.commands.len(), 1);
    let segs = &r.commands[0].segments;
    assert_eq!(segs.len(), 3, "{segs:?}");
    assert!(
        segs[0].iova.0 > segs[1].iova.0 && segs[1].iova.0 > segs[2].iova.0,
        "{segs:?}"
    );
    let (a, b, c) = (segs[0].iova.0, segs[1].iova.0, segs[2].iova.0);
    let want = format!(
        r#"{{"op":"write","slba":1000,"lbas":3,"dptr":"sgl","descriptors":[{{"type":"last_segment","addr":"0x7ff0000000000000","len":48}},{{"type":"data","addr":"{a:#x}","len":4096}},{{"type":"data","addr":"{b:#x}","len":4096}},{{"type":"data","addr":"{c:#x}","len":4096}}],"pages":[0,1,2],"fallback":false}}"#
    );
    assert_eq!(r.json_lines()[0], want);
    assert_eq!(r.commands[0].list_pages, 1);
    assert_eq!(
        r.device.read_bytes(1000 * 4096, 3 * 4096),
        written(0, 3 * 4096),
        "each page's bytes reached its LBAs through the SGL"
    );
    // The page lines are as ever.
    assert_eq!(
        r.json_lines()[1],
        r#"{"page":0,"uptodate":true,"dirty":false,"zeroed_from":null,"mapped_to_disk":true,"error":null}"#
    );

    // Without the option: the line of a PRP-only device, byte for byte as it always was.
    let lines = trace(&map, &ops).unwrap();
    assert_eq!(
        lines[0],
        r#"{"op":"write","slba":1000,"lbas":3,"prps":3,"pages":[0,1,2],"fallback":false}"#
    );
    assert_eq!(lines, trace_with(&map, &ops, PRP).unwrap());
}

#[test]
fn one_page_carries_prps_and_a_contiguous_run_one_data_block_in_the_command() {
    let map = contiguous_16();
    // Page 7 first (its own frame), then pages 0..4 into four frames in a row: one piece.
    let r = run(
        &map,
        &[TraceOp::ReadPage(7), TraceOp::Read { start: 0, count: 4 }],
        SGL,
    );
    let l = lines(&r);
    assert_eq!(
        l[0],
        json!({"op":"read","slba":1007,"lbas":1,"dptr":"prp","prps":1,"pages":[7],
               "fallback":false}),
        "Auto takes PRPs for data within two pages"
    );
    let first = r.commands[1].segments[0].iova.0;
    assert_eq!(r.commands[1].segments.len(), 1);
    assert_eq!(
        l[1],
        json!({"op":"read","slba":1000,"lbas":4,"dptr":"sgl",
               "descriptors":[{"type":"data","addr":format!("{first:#x}"),"len":16384}],
               "pages":[0,1,2,3],"fallback":false}),
        "four pages in one piece: a Data Block in the command, no list"
    );
    assert_eq!(r.commands[1].list_pages, 0);
    for p in [0, 1, 2, 3, 7] {
        assert_eq!(r.page_data[&p], disk((1000 + p) * 4096, 4096), "page {p}");
    }
}

#[test]
fn hole_pages_split_the_data_into_descriptors_and_two_pieces_take_prp1_and_prp2() {
    // Pages 0, 2 and 4 in one command; pages 1 and 3 are holes and their frames lie between.
    let map = map_json(
        4096,
        4096,
        5 * 4096,
        &[(0, 100, 1), (2, 101, 1), (4, 102, 1)],
    );
    let r = run(&map, &[TraceOp::Read { start: 0, count: 5 }], SGL);
    let l = lines(&r);
    assert_eq!(l[0]["pages"], json!([0, 2, 4]));
    assert_eq!(l[0]["dptr"], "sgl");
    assert!(l[0].get("prps").is_none(), "{}", l[0]);
    let types: Vec<&str> = l[0]["descriptors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["last_segment", "data", "data", "data"]);
    assert_eq!(r.page_data[&2], disk(101 * 4096, 4096));
    assert_eq!(r.page_data[&4], disk(102 * 4096, 4096));
    assert_eq!(r.page_data[&1], vec![0; 4096]);
    assert_eq!(r.page_data[&3], vec![0; 4096]);

    // Two pieces of a page each: PRP1 ends a page and PRP2 starts one, no list and no SGL.
    let map = map_json(4096, 4096, 3 * 4096, &[(0, 100, 1), (2, 101, 1)]);
    let r = run(&map, &[TraceOp::Read { start: 0, count: 3 }], SGL);
    let l = lines(&r);
    assert_eq!(r.commands[0].segments.len(), 2);
    assert_eq!(
        l[0],
        json!({"op":"read","slba":100,"lbas":2,"dptr":"prp","prps":2,"pages":[0,2],
               "fallback":false})
    );
    assert_eq!(r.commands[0].list_pages, 0);
    assert_eq!(r.page_data[&0], disk(100 * 4096, 4096));
    assert_eq!(r.page_data[&2], disk(101 * 4096, 4096));
    assert_eq!(r.page_data[&1], vec![0; 4096]);
}

/// Whether the driver's Auto mode takes PRPs for these segments: one piece within two pages,
/// or two pieces where PRP1 ends a page and PRP2 starts one (no list either way).
fn auto_takes_prps(segs: &[rnvme_driver::Segment]) -> bool {
    match segs {
        [s] => s.iova.0 % 4096 + s.len as u64 <= 8192,
        [a, b] => a.iova.0 % 4096 + a.len as u64 == 4096 && b.iova.0 % 4096 == 0 && b.len <= 4096,
        _ => false,
    }
}

#[test]
fn sgls_change_the_data_pointers_and_nothing_else() {
    let small = |ext: &[(u64, u64, u64)], size| map_json(1024, 512, size, ext);
    let cases: Vec<(String, Vec<TraceOp>)> = vec![
        (
            contiguous_16(),
            vec![TraceOp::Read {
                start: 0,
                count: 16,
            }],
        ),
        (contiguous_16(), vec![TraceOp::Read { start: 3, count: 2 }]),
        (
            contiguous_16(),
            vec![
                TraceOp::WritePages(vec![9, 3, 4, 8, 5]),
                TraceOp::Read {
                    start: 0,
                    count: 16,
                },
            ],
        ),
        // Blocks of a page in different places: per-block commands of 1 KiB in the frame.
        (
            small(&[(0, 100, 2), (2, 300, 2), (4, 302, 4)], 8 * 1024),
            vec![TraceOp::Read { start: 0, count: 2 }],
        ),
        (
            small(&[(0, 100, 16)], 16 * 1024),
            vec![
                TraceOp::WriteBlocks(vec![1, 2, 9]),
                TraceOp::WritePages(vec![3, 1]),
            ],
        ),
        // The end of the file inside a page.
        (
            small(&[(0, 100, 5)], 5120),
            vec![TraceOp::WritePages(vec![1, 0])],
        ),
    ];
    let (mut prps, mut in_command, mut with_lists) = (0, 0, 0);
    for (map, ops) in &cases {
        let prp = run(map, ops, PRP);
        let sgl = run(map, ops, SGL);
        let shape = |r: &TraceReport| {
            r.commands
                .iter()
                .map(|c| (c.op, c.slba, c.lbas, c.pages.clone(), c.fallback))
                .collect::<Vec<_>>()
        };
        assert_eq!(shape(&prp), shape(&sgl), "{ops:?}");
        assert_eq!(prp.pages, sgl.pages, "{ops:?}");
        assert_eq!(prp.page_data, sgl.page_data, "{ops:?}");
        assert_eq!(prp.events, sgl.events, "{ops:?}");
        let lbas = prp.device.written_lbas();
        assert_eq!(lbas, sgl.device.written_lbas(), "{ops:?}");
        for lba in lbas {
            assert_eq!(
                prp.device.read_lba(lba),
                sgl.device.read_lba(lba),
                "{ops:?}"
            );
        }
        for ((c, p), line) in sgl.commands.iter().zip(&prp.commands).zip(lines(&sgl)) {
            assert_eq!(c.segments, p.segments, "the same frames");
            assert_eq!(p.dptr, DataPointer::Prp);
            match &c.dptr {
                DataPointer::Prp => {
                    assert!(auto_takes_prps(&c.segments), "{c:?}");
                    prps += 1;
                    assert_eq!((c.prps, c.list_pages), (p.prps, p.list_pages));
                    assert_eq!(line["dptr"], "prp");
                    assert_eq!(line["prps"], json!(c.prps));
                }
                DataPointer::Sgl(d) => {
                    assert!(!auto_takes_prps(&c.segments), "{c:?}");
                    if c.list_pages == 0 {
                        in_command += 1;
                    } else {
                        with_lists += 1;
                    }
                    assert_eq!(line["dptr"], "sgl");
                    assert_eq!(line["descriptors"].as_array().unwrap().len(), d.len());
                    let blocks: Vec<_> = d
                        .iter()
                        .filter_map(|e| match *e {
                            SglEntry::Data { addr, len } => Some((addr, len)),
                            _ => None,
                        })
                        .collect();
                    let pieces: Vec<_> = c.segments.iter().map(|s| (s.iova, s.len)).collect();
                    assert_eq!(blocks, pieces, "one Data Block per piece, in order");
                }
                DataPointer::None => panic!("the trace issues no Flush: {c:?}"),
            }
        }
    }
    // PRPs came up, and SGLs both in the command alone and with a list.
    assert!(
        prps > 0 && in_command > 0 && with_lists > 0,
        "{prps} {in_command} {with_lists}"
    );
}
