//! The mpage page cache end to end on QEMU's NVMe: in the guest the kernel driver fills the
//! start of the namespace with a known pattern; after `rnvme setup`, `rnvme mpage read`
//! reads files laid out by contiguous, fragmented and holey extent maps (MAP.json files made
//! here) and every byte is compared with the file computed here from the pattern;
//! `rnvme mpage write` writes a file over mapped blocks and holes it allocates, syncs, and
//! after `rnvme reset` the kernel driver reads the whole region back (`dd iflag=direct`) for
//! comparison with the disk computed here. Once with 4 KiB blocks on 4 KiB LBAs, once with
//! 1 KiB blocks on 512-byte LBAs (where pages are confused and take the per-block path).

use std::fs;
use std::path::{Path, PathBuf};

use rnvme_tests::{run_guest, Steps};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};
use serde_json::{json, Value};

const PAGE: u64 = 4096;
/// Bytes at the start of the namespace filled with the pattern and checked after the write.
const REGION: u64 = 4 << 20;
/// Where the test files are in the guest.
const GUEST_DIR: &str = "/m";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p =
            std::env::temp_dir().join(format!("rnvme-mpage-guest-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn put(&self, name: &str, data: &[u8]) {
        fs::write(self.0.join(name), data).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Deterministic bytes for stream `seed` (xorshift64*, eight bytes per step).
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// One extent: file block, disk block, blocks, boundary on its last block.
type Ext = (u64, u64, u64, bool);

/// A MAP.json.
#[derive(Clone)]
struct Map {
    block_size: u64,
    lba_size: u64,
    file_size: u64,
    extents: Vec<Ext>,
    max_transfer: Option<u64>,
    allocate_from: Option<u64>,
}

impl Map {
    fn json(&self) -> String {
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|&(f, d, n, b)| json!({"file_block": f, "disk_block": d, "blocks": n, "boundary": b}))
            .collect();
        let mut v = json!({
            "block_size": self.block_size,
            "lba_size": self.lba_size,
            "file_size": self.file_size,
            "extents": extents,
        });
        if let Some(m) = self.max_transfer {
            v["max_transfer"] = json!(m);
        }
        if let Some(a) = self.allocate_from {
            v["allocate_from"] = json!(a);
        }
        v.to_string()
    }

    fn blocks(&self) -> u64 {
        self.file_size.div_ceil(self.block_size)
    }

    /// The disk block of each file block, None for a hole.
    fn layout(&self) -> Vec<Option<u64>> {
        let mut out = vec![None; self.blocks() as usize];
        for &(f, d, n, _) in &self.extents {
            for i in 0..n {
                if let Some(slot) = out.get_mut((f + i) as usize) {
                    *slot = Some(d + i);
                }
            }
        }
        out
    }

    /// The layout after a write of the whole file: holes take blocks from `allocate_from`
    /// on, one each, in file order.
    fn layout_after_write(&self) -> Vec<u64> {
        let from = self.allocate_from.expect("a map that allocates");
        let used: Vec<u64> = self.layout().into_iter().flatten().collect();
        let mut next = from;
        self.layout()
            .into_iter()
            .map(|m| {
                m.unwrap_or_else(|| {
                    assert!(
                        !used.contains(&next),
                        "the test's allocation area is in use"
                    );
                    next += 1;
                    next - 1
                })
            })
            .collect()
    }

    /// The file's bytes on a disk holding `disk` from byte 0.
    fn expected(&self, disk: &[u8]) -> Vec<u8> {
        let bs = self.block_size as usize;
        let mut out = Vec::with_capacity(self.blocks() as usize * bs);
        for m in self.layout() {
            match m {
                Some(d) => out.extend_from_slice(&disk[d as usize * bs..(d as usize + 1) * bs]),
                None => out.extend(std::iter::repeat_n(0u8, bs)),
            }
        }
        out.truncate(self.file_size as usize);
        out
    }

    /// Pages wholly inside holes (or past the mapped blocks) within the file.
    fn hole_pages(&self) -> u64 {
        let bpp = (PAGE / self.block_size) as usize;
        let layout = self.layout();
        layout
            .chunks(bpp)
            .filter(|blocks| blocks.iter().all(Option::is_none))
            .count() as u64
    }

    fn mapped_blocks(&self) -> u64 {
        self.layout().iter().flatten().count() as u64
    }
}

/// Extents describing `layout` (runs of consecutive blocks), for reading a written file back.
fn runs(layout: &[u64]) -> Vec<Ext> {
    let mut out: Vec<Ext> = Vec::new();
    for (f, &d) in layout.iter().enumerate() {
        match out.last_mut() {
            Some((lf, ld, n, _)) if *lf + *n == f as u64 && *ld + *n == d => *n += 1,
            _ => out.push((f as u64, d, 1, false)),
        }
    }
    out
}

/// A read through the cache: the map, whether per-block is forced, and checks on its figures.
struct ReadCase {
    name: &'static str,
    map: Map,
    per_block: bool,
}

struct Geometry {
    tag: &'static str,
    lba_size: u32,
    block_size: u64,
    reads: Vec<ReadCase>,
    write: Map,
}

fn counter(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// Boot a guest for `g`, run every case, and check every byte.
fn run_geometry(g: Geometry) {
    let dir = Scratch::new(g.tag);
    let disk = pattern(7, REGION);
    dir.put("pattern", &disk);
    let mut script = String::new();
    let mut line = |s: String| {
        script.push_str(&s);
        script.push('\n');
    };
    line("step kblk wait_blk $NVME0 1".into());
    line("DEV=$(blk $NVME0 1)".into());
    line(format!("step fill kwrite $DEV {GUEST_DIR}/pattern 0"));
    line("step setup rnvme setup --hugepages 0 $NVME0".into());
    for c in &g.reads {
        assert_eq!(c.map.block_size, g.block_size);
        dir.put(&format!("{}.json", c.name), c.map.json().as_bytes());
        dir.put(&format!("{}.expect", c.name), &c.map.expected(&disk));
        let pb = if c.per_block { " --per-block" } else { "" };
        line(format!(
            "step read_{n} rnvme mpage read $NVME0 --ns 1 --map {GUEST_DIR}/{n}.json --out /tmp/d/{n}{pb} --json",
            n = c.name
        ));
        line(format!(
            "step same_{n} same /tmp/d/{n} {GUEST_DIR}/{n}.expect",
            n = c.name
        ));
    }

    // The write: the whole file at offset 0 over mapped blocks and holes.
    let w = &g.write;
    let data = pattern(11, w.file_size);
    let after = w.layout_after_write();
    let bs = w.block_size as usize;
    let mut region = disk.clone();
    for (b, &d) in after.iter().enumerate() {
        let mut block = vec![0u8; bs];
        let from = b * bs;
        let n = (data.len() - from).min(bs);
        block[..n].copy_from_slice(&data[from..from + n]);
        let at = d as usize * bs;
        assert!(
            at + bs <= REGION as usize,
            "the write stays in the checked region"
        );
        region[at..at + bs].copy_from_slice(&block);
    }
    let reread = Map {
        extents: runs(&after),
        allocate_from: None,
        ..w.clone()
    };
    dir.put("w.json", w.json().as_bytes());
    dir.put("w.data", &data);
    dir.put("w_after.json", reread.json().as_bytes());
    dir.put("region.expect", &region);
    line(format!(
        "step write rnvme mpage write $NVME0 --map {GUEST_DIR}/w.json --in {GUEST_DIR}/w.data --json"
    ));
    line(format!(
        "step reread rnvme mpage read $NVME0 --map {GUEST_DIR}/w_after.json --out /tmp/d/w_after --json"
    ));
    line(format!(
        "step same_reread same /tmp/d/w_after {GUEST_DIR}/w.data"
    ));
    line("step reset rnvme reset $NVME0".into());
    line("step kblk2 wait_blk $NVME0 1".into());
    line("DEV=$(blk $NVME0 1)".into());
    line(format!("step kread kread $DEV 0 {REGION} /tmp/d/region"));
    line(format!(
        "step same_region same /tmp/d/region {GUEST_DIR}/region.expect"
    ));

    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                size_mib: 64,
                lba_size: g.lba_size,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        files: vec![(dir.0.clone(), GUEST_DIR.to_string())],
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script);
    let s = &run.steps;
    for name in ["kblk", "fill", "setup"] {
        s.ok(name);
    }
    for c in &g.reads {
        check_read(s, c);
    }
    check_write(s, w, &after);
    for name in ["same_reread", "reset", "kblk2", "kread", "same_region"] {
        s.ok(name);
    }
}

fn check_read(s: &Steps, c: &ReadCase) {
    let step = s.ok(&format!("read_{}", c.name));
    s.ok(&format!("same_{}", c.name));
    let v = step.json();
    let m = &c.map;
    let pages = m.file_size.div_ceil(PAGE);
    let what = format!("read {}: {v}", c.name);
    assert_eq!(counter(&v, "bytes"), m.file_size, "{what}");
    assert_eq!(v["per_block"], json!(c.per_block), "{what}");
    let (cmds, fallback) = (
        counter(&v, "read_commands"),
        counter(&v, "fallback_commands"),
    );
    if let Some(mt) = m.max_transfer {
        assert_eq!(counter(&v, "max_transfer"), mt, "{what}");
    }
    if c.per_block {
        assert_eq!(
            (cmds, fallback),
            (m.mapped_blocks(), m.mapped_blocks()),
            "{what}"
        );
        return;
    }
    let bpp = PAGE / m.block_size;
    // Pages whose blocks are contiguous and plain take the fast path; the cases say which.
    let confused = m.layout().chunks(bpp as usize).any(|blocks| {
        let mapped: Vec<u64> = blocks.iter().flatten().copied().collect();
        let contiguous = mapped.windows(2).all(|w| w[1] == w[0] + 1);
        let hole_then_data = blocks
            .iter()
            .skip_while(|b| b.is_some())
            .any(Option::is_some);
        !contiguous || hole_then_data
    });
    assert_eq!(fallback > 0, confused, "{what}");
    assert_eq!(counter(&v, "pages_zeroed"), m.hole_pages(), "{what}");
    if !confused {
        assert_eq!(
            counter(&v, "pages_read"),
            pages - m.hole_pages(),
            "every page with data is read once: {what}"
        );
        // Contiguous runs become commands of the max transfer; a readahead window can end
        // one early.
        let per_cmd = counter(&v, "max_transfer") / PAGE;
        let runs = runs_of_pages(m);
        let least: u64 = runs.iter().map(|r| r.div_ceil(per_cmd)).sum();
        assert!(
            cmds >= least && cmds <= least + counter(&v, "readahead_windows"),
            "{cmds} commands for runs of {runs:?} pages at {per_cmd} pages a command: {what}"
        );
    }
}

/// Lengths in pages of the runs of pages that follow one another on disk, as the read path
/// builds commands: a page wholly in a hole is skipped without ending the run, a page that
/// ends in a hole ends it.
fn runs_of_pages(m: &Map) -> Vec<u64> {
    let bpp = (PAGE / m.block_size) as usize;
    let mut runs = Vec::new();
    let mut cur = 0u64;
    let mut next_disk = None;
    for blocks in m.layout().chunks(bpp) {
        let mapped: Vec<u64> = blocks.iter().flatten().copied().collect();
        match mapped.first() {
            None => {}
            Some(&first) => {
                if next_disk != Some(first) && cur > 0 {
                    runs.push(cur);
                    cur = 0;
                }
                cur += 1;
                // A page ending early (end of file) ends the run after it.
                next_disk = (mapped.len() == bpp).then(|| first + bpp as u64);
            }
        }
    }
    if cur > 0 {
        runs.push(cur);
    }
    runs
}

fn check_write(s: &Steps, w: &Map, after: &[u64]) {
    let v = s.ok("write").json();
    let what = format!("write: {v}");
    assert_eq!(counter(&v, "bytes"), w.file_size, "{what}");
    assert_eq!(counter(&v, "file_size"), w.file_size, "{what}");
    assert_eq!(counter(&v, "flush_commands"), 1, "{what}");
    assert_eq!(counter(&v, "write_errors"), 0, "{what}");
    assert_eq!(
        counter(&v, "pages_written"),
        w.file_size.div_ceil(PAGE),
        "{what}"
    );
    // The extents the map ends with, block by block, are the layout computed here.
    let mut got = vec![None; after.len()];
    for e in v["extents"].as_array().expect("extents") {
        let (f, d, n) = (
            counter(e, "file_block"),
            counter(e, "disk_block"),
            counter(e, "blocks"),
        );
        for i in 0..n {
            if let Some(slot) = got.get_mut((f + i) as usize) {
                *slot = Some(d + i);
            }
        }
    }
    let want: Vec<Option<u64>> = after.iter().map(|&d| Some(d)).collect();
    assert_eq!(got, want, "{what}");
    let r = s.ok("reread").json();
    assert_eq!(counter(&r, "bytes"), w.file_size, "reread: {r}");
}

fn map(bs: u64, lba: u64, file_size: u64, extents: &[Ext]) -> Map {
    Map {
        block_size: bs,
        lba_size: lba,
        file_size,
        extents: extents.to_vec(),
        max_transfer: None,
        allocate_from: None,
    }
}

#[test]
fn cache_reads_and_writes_4k_blocks_on_4k_lbas() {
    let (bs, lba) = (4096, 4096);
    let contiguous = || map(bs, lba, 512 * bs, &[(0, 100, 512, false)]);
    let fragmented = map(
        bs,
        lba,
        100 * bs - 1000,
        &[
            (0, 600, 8, false),
            (8, 300, 5, false),
            (13, 900, 20, true),
            (33, 50, 3, false),
            (36, 700, 64, false),
        ],
    );
    let holey = map(
        bs,
        lba,
        64 * bs,
        &[
            (0, 200, 4, false),
            (10, 210, 6, false),
            (40, 400, 10, false),
        ],
    );
    let reads = vec![
        ReadCase {
            name: "contiguous",
            map: contiguous(),
            per_block: false,
        },
        ReadCase {
            name: "contiguous_64k",
            map: Map {
                max_transfer: Some(64 << 10),
                ..contiguous()
            },
            per_block: false,
        },
        ReadCase {
            name: "fragmented",
            map: fragmented,
            per_block: false,
        },
        ReadCase {
            name: "holey",
            map: holey,
            per_block: false,
        },
        ReadCase {
            name: "holey_per_block",
            map: map(
                bs,
                lba,
                64 * bs,
                &[
                    (0, 200, 4, false),
                    (10, 210, 6, false),
                    (40, 400, 10, false),
                ],
            ),
            per_block: true,
        },
    ];
    let write = Map {
        allocate_from: Some(950),
        ..map(
            bs,
            lba,
            30 * bs - 300,
            &[(0, 800, 6, false), (6, 820, 4, false), (16, 840, 8, false)],
        )
    };
    run_geometry(Geometry {
        tag: "4k",
        lba_size: 4096,
        block_size: bs,
        reads,
        write,
    });
}

#[test]
fn cache_reads_and_writes_1k_blocks_on_512_byte_lbas() {
    let (bs, lba) = (1024, 512);
    let reads = vec![
        ReadCase {
            name: "contiguous",
            map: map(bs, lba, 2048 * bs, &[(0, 64, 2048, false)]),
            per_block: false,
        },
        ReadCase {
            // Extents that end inside pages: most pages are confused.
            name: "fragmented",
            map: map(
                bs,
                lba,
                61 * bs - 100,
                &[
                    (0, 1000, 3, false),
                    (3, 2000, 5, false),
                    (8, 1500, 13, false),
                    (21, 100, 40, false),
                ],
            ),
            per_block: false,
        },
        ReadCase {
            // A hole inside a page before data, a wholly hole page, a hole ending a page,
            // and a hole to the end of the file.
            name: "holey",
            map: map(
                bs,
                lba,
                40 * bs,
                &[
                    (0, 10, 2, false),
                    (3, 500, 5, false),
                    (16, 600, 2, false),
                    (20, 700, 12, false),
                ],
            ),
            per_block: false,
        },
        ReadCase {
            name: "fragmented_per_block",
            map: map(
                bs,
                lba,
                61 * bs - 100,
                &[
                    (0, 1000, 3, false),
                    (3, 2000, 5, false),
                    (8, 1500, 13, false),
                    (21, 100, 40, false),
                ],
            ),
            per_block: true,
        },
    ];
    // Page 0 contiguous, page 1 split on disk, page 2 a hole, page 3 three mapped blocks and
    // a hole, pages 4-5 contiguous, page 6 holes with the end of the file inside it.
    let write = Map {
        allocate_from: Some(3900),
        ..map(
            bs,
            lba,
            27 * bs - 200,
            &[
                (0, 3000, 4, false),
                (4, 3100, 2, false),
                (6, 3200, 2, false),
                (12, 3300, 3, false),
                (16, 3400, 8, false),
            ],
        )
    };
    run_geometry(Geometry {
        tag: "1k",
        lba_size: 512,
        block_size: bs,
        reads,
        write,
    });
}

#[test]
fn host_model_of_the_maps() {
    // The expectations above rest on these helpers: check them on small cases.
    let m = map(
        1024,
        512,
        5 * 1024 - 10,
        &[(0, 2, 2, false), (3, 9, 1, false)],
    );
    assert_eq!(m.layout(), vec![Some(2), Some(3), None, Some(9), None]);
    let disk: Vec<u8> = (0..20 * 1024).map(|i| (i / 1024) as u8).collect();
    let e = m.expected(&disk);
    assert_eq!(e.len(), 5 * 1024 - 10);
    assert!(e[..1024].iter().all(|&b| b == 2));
    assert!(e[2048..3072].iter().all(|&b| b == 0));
    assert!(e[3072..4096].iter().all(|&b| b == 9));
    let w = Map {
        allocate_from: Some(12),
        ..map(1024, 512, 5 * 1024, &[(0, 2, 2, false), (3, 9, 1, false)])
    };
    assert_eq!(w.layout_after_write(), vec![2, 3, 12, 9, 13]);
    assert_eq!(
        runs(&[2, 3, 12, 9, 13, 14]),
        vec![
            (0, 2, 2, false),
            (2, 12, 1, false),
            (3, 9, 1, false),
            (4, 13, 2, false)
        ]
    );
    assert_eq!(m.hole_pages(), 1, "page 1 holds only block 4, a hole");
    let h = map(4096, 4096, 6 * 4096, &[(0, 1, 2, false), (4, 10, 1, false)]);
    assert_eq!((h.hole_pages(), h.mapped_blocks()), (3, 3));
    assert_eq!(runs_of_pages(&h), vec![2, 1]);
    let skip = map(4096, 4096, 3 * 4096, &[(0, 1, 1, false), (2, 2, 1, false)]);
    assert_eq!(
        runs_of_pages(&skip),
        vec![2],
        "a hole page does not end a run"
    );
    let c = map(1024, 512, 8 * 1024 + 100, &[(0, 4, 9, false)]);
    assert_eq!(runs_of_pages(&c), vec![3]);
    assert_eq!(pattern(3, 20), pattern(3, 24)[..20]);
    assert_ne!(pattern(3, 64), pattern(4, 64));
    let p: &Path = Path::new(GUEST_DIR);
    assert!(p.is_absolute());
}

/// The digest `rnvme mpage bench` prints for data at byte 0 of its file.
fn bench_digest(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    for (i, c) in data.chunks(8).enumerate() {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        let mut x = u64::from_le_bytes(w) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        sum = sum.wrapping_add(x ^ (x >> 29));
    }
    sum
}

#[test]
fn bench_passes_read_the_pattern_and_bad_requests_are_refused() {
    let dir = Scratch::new("bench");
    // 8 MiB of pattern at byte 1 MiB (LBA 2048 of 512-byte LBAs).
    let data = pattern(5, 8 << 20);
    dir.put("data", &data);
    let bad_lba = map(4096, 4096, 8192, &[(0, 0, 2, false)]);
    let too_far = map(4096, 512, 8192, &[(0, 16383, 2, false)]);
    let bad_alloc = Map {
        allocate_from: Some(1 << 20),
        ..map(4096, 512, 8192, &[(0, 0, 2, false)])
    };
    dir.put("bad_lba.json", bad_lba.json().as_bytes());
    dir.put("too_far.json", too_far.json().as_bytes());
    dir.put("bad_alloc.json", bad_alloc.json().as_bytes());
    dir.put("not_json.json", b"{\"block_size\":");
    dir.put("empty", b"");
    let script = format!(
        "step kblk wait_blk $NVME0 1\n\
         DEV=$(blk $NVME0 1)\n\
         step fill kwrite $DEV {d}/data 1048576\n\
         step setup rnvme setup --hugepages 0 $NVME0\n\
         step bench rnvme mpage bench $NVME0 --lba 2048 --mib 8 --rounds 1 --threads 2 --random 64 --json\n\
         step human rnvme mpage bench $NVME0 --lba 2048 --mib 2 --rounds 1 --depth 2 --threads 2 --random 8\n\
         step irq rnvme mpage bench $NVME0 --lba 2048 --mib 8 --rounds 1 --threads 2 --random 64 --wait interrupt --json\n\
         step hybrid rnvme mpage bench $NVME0 --lba 2048 --mib 2 --rounds 1 --threads 2 --random 8 --wait hybrid --spin-us 5 --json\n\
         step bad_wait rnvme mpage bench $NVME0 --lba 2048 --mib 1 --wait sometimes\n\
         step no_threads rnvme mpage bench $NVME0 --lba 2048 --mib 1 --threads 0\n\
         step many_threads rnvme mpage bench $NVME0 --lba 2048 --mib 8 --threads 9\n\
         step unaligned rnvme mpage bench $NVME0 --lba 3 --mib 1\n\
         step beyond rnvme mpage bench $NVME0 --lba 0 --mib 65\n\
         step bad_lba rnvme mpage read $NVME0 --map {d}/bad_lba.json\n\
         step too_far rnvme mpage read $NVME0 --map {d}/too_far.json\n\
         step bad_alloc rnvme mpage write $NVME0 --map {d}/bad_alloc.json --in {d}/data\n\
         step not_json rnvme mpage read $NVME0 --map {d}/not_json.json\n\
         step empty rnvme mpage write $NVME0 --map {d}/too_far.json --in {d}/empty\n\
         step no_ns rnvme mpage read $NVME0 --ns 9 --map {d}/too_far.json\n\
         step reset rnvme reset $NVME0\n",
        d = GUEST_DIR
    );
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                size_mib: 64,
                lba_size: 512,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        files: vec![(dir.0.clone(), GUEST_DIR.to_string())],
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script);
    let s = &run.steps;
    for name in ["kblk", "fill", "setup", "reset"] {
        s.ok(name);
    }
    // Readers that sleep on their queue pairs' interrupts (and that poll, then sleep) read
    // the same bytes: every pass, the threads and the random pages.
    for step in ["irq", "hybrid"] {
        let w = s.ok(step).json();
        let what = format!("{step}: {w}");
        assert_eq!(w["data_matches"], json!(true), "{what}");
        assert_eq!(w["threads"]["data_matches"], json!(true), "{what}");
        assert_eq!(w["random"]["data_matches"], json!(true), "{what}");
    }
    assert_eq!(
        s.ok("irq").json()["digest"],
        json!(format!("{:#018x}", bench_digest(&data))),
        "interrupt-driven waits read the pattern"
    );
    let bad = s.failed("bad_wait", 2);
    assert!(bad.stderr.contains("sometimes"), "{}", bad.stderr);
    let v = s.ok("bench").json();
    let what = format!("bench: {v}");
    assert_eq!(v["data_matches"], json!(true), "{what}");
    assert_eq!(
        v["digest"],
        json!(format!("{:#018x}", bench_digest(&data))),
        "the passes read the pattern: {what}"
    );
    let pages = (8 << 20) / PAGE;
    let (cache, per_block, raw, sync) = (&v["cache"], &v["per_block"], &v["raw"], &v["raw_sync"]);
    assert_eq!(counter(cache, "pages_read"), pages, "{what}");
    assert_eq!(counter(cache, "fallback_commands"), 0, "{what}");
    let per_cmd = counter(&v, "max_transfer") / PAGE;
    assert!(
        counter(cache, "read_commands") <= pages / per_cmd + counter(cache, "readahead_windows"),
        "{what}"
    );
    assert_eq!(
        (
            counter(per_block, "read_commands"),
            counter(per_block, "fallback_commands")
        ),
        (pages, pages),
        "{what}"
    );
    assert_eq!(counter(raw, "commands"), pages / per_cmd, "{what}");
    assert_eq!(counter(sync, "commands"), pages / per_cmd, "{what}");
    assert!(counter(raw, "max_in_flight") > 1, "{what}");
    let (in_place, raw_in_place) = (&v["cache_in_place"], &v["raw_in_place"]);
    assert_eq!(counter(in_place, "pages_read"), pages, "{what}");
    assert_eq!(counter(raw_in_place, "commands"), pages / per_cmd, "{what}");
    for pass in [cache, per_block, raw, sync, in_place, raw_in_place] {
        assert!(pass["mib_per_s"].as_f64().unwrap() > 0.0, "{what}");
    }
    // Where the time went: the copying passes copied, the in-place ones did not.
    assert!(counter(cache, "copy_out_ns") > 0, "{what}");
    assert_eq!(counter(in_place, "copy_out_ns"), 0, "{what}");
    let seconds = |v: &Value, name: &str| v["time"][name].as_f64().unwrap();
    assert!(seconds(raw, "copy_seconds") > 0.0, "{what}");
    assert_eq!(seconds(raw_in_place, "copy_seconds"), 0.0, "{what}");
    // Two threads, a file each (the second one 8 MiB further), each read what raw reads of it.
    let t = &v["threads"];
    assert_eq!(t["data_matches"], json!(true), "{what}");
    assert_eq!(
        (
            counter(&t["one"], "threads"),
            counter(&t["many"], "threads")
        ),
        (1, 2)
    );
    assert!(
        counter(&t["many"], "read_commands") >= 2 * pages / per_cmd,
        "{what}"
    );
    // The same two files raw, a queue pair each: every command of the max transfer.
    assert_eq!(
        (
            counter(&t["raw_one"], "threads"),
            counter(&t["raw_one"], "read_commands"),
            counter(&t["raw_many"], "threads"),
            counter(&t["raw_many"], "read_commands")
        ),
        (1, pages / per_cmd, 2, 2 * pages / per_cmd),
        "{what}"
    );
    assert!(t["raw_scaling"].as_f64().unwrap() > 0.0, "{what}");
    for pass in ["one", "many", "raw_one", "raw_many"] {
        let busy = seconds(&t[pass], "busy_seconds");
        let copy = seconds(&t[pass], "copy_seconds");
        assert!(copy > 0.0 && copy < busy, "{pass}: {what}");
    }
    // 64 distinct random pages, through a cold cache and raw: the same bytes.
    let r = &v["random"];
    assert_eq!(r["data_matches"], json!(true), "{what}");
    assert_eq!(
        (counter(&r["cache"], "reads"), counter(&r["raw"], "reads")),
        (64, 64)
    );
    assert!(
        (1..=64).contains(&counter(&r["cache"], "commands")),
        "{what}"
    );
    let human = s.ok("human");
    for needle in [
        "cache /",
        "per-block",
        "raw sync",
        "up to 2 in flight",
        "in place",
        "2 threads on 2 files",
        "data matches raw",
        "2 threads raw on a queue each",
        "time: copy",
        "time: 2 threads: copy",
        "8 distinct 4 KiB pages",
    ] {
        assert!(human.stdout.contains(needle), "{}", human.describe());
    }
    let usage = [
        ("unaligned", "not 4 KiB aligned"),
        ("beyond", "reach past namespace 1"),
        ("no_threads", "--threads must be 1 to"),
        ("many_threads", "9 file(s) of 8 MiB"),
        ("bad_lba", "namespace 1 has 512-byte LBAs"),
        ("too_far", "extents[0]"),
        ("bad_alloc", "allocate_from"),
        ("not_json", "not valid JSON"),
        ("empty", "nothing to write"),
        ("no_ns", "9"),
    ];
    for (name, needle) in usage {
        s.failed(name, 2).clean_error().stderr_has(&[needle]);
    }
}
