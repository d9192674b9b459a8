//! The ext reader against images made by Debian's e2fsprogs (`mke2fs -d`, `debugfs -w`,
//! `e2fsck -D`), loaded into a [`RecordingDevice`] and read through [`ExtFs`] and the page
//! cache, byte for byte against the source files. `debugfs stat` is the independent oracle
//! for where each file's blocks are.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rnvme_driver::dma::{Backing, DmaPool};
use rnvme_driver::hw::MemoryOnly;

use super::*;
use crate::backend::IoOp;
use crate::cache::{CacheOptions, CacheStats, PageCache};
use crate::map::BlockMap;
use crate::pool::{PagePool, PAGE_SIZE};
use crate::recording::{fill_pattern, RecordingDevice};

// ---- scratch space and e2fsprogs -------------------------------------------------------

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rnvme-ext-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Run a tool, failing the test with its output when it fails. `ok` lists the exit codes
/// that count as success.
fn run(cmd: &mut Command, ok: &[i32]) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the tests need e2fsprogs: apt-get install e2fsprogs)")
    });
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok.contains(&code),
        "{cmd:?} exited with {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mke2fs -t KIND -b BS OPTS -d SRC IMG SIZE`.
fn mkfs(img: &Path, kind: &str, bs: u32, opts: &[&str], src: &Path, size: &str) {
    run(
        Command::new("mke2fs")
            .args(["-F", "-q", "-t", kind, "-b", &bs.to_string()])
            .args(opts)
            .arg("-d")
            .arg(src)
            .arg(img)
            .arg(size),
        &[0],
    );
}

/// Run debugfs commands read-write; any complaint on stderr fails the test.
fn debugfs_w(img: &Path, cmds: &[String]) {
    let file = img.with_extension("debugfs");
    fs::write(&file, cmds.join("\n") + "\n").unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(img)
        .output()
        .expect("run debugfs");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "debugfs {cmds:?}: {err}"
    );
}

/// The data runs of a file as `debugfs stat` reports them: (file block, disk block,
/// blocks), uninitialised extents left out, contiguous runs merged.
fn debugfs_runs(img: &Path, path: &str) -> Vec<(u64, u64, u64)> {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(img),
        &[0],
    );
    let section = out
        .split_once("EXTENTS:\n")
        .or_else(|| out.split_once("BLOCKS:\n"))
        .map(|(_, s)| s)
        .unwrap_or("");
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for item in section.split([',', '\n']).map(str::trim) {
        // "(a-b):c-d", "(a):c", "(a-b[u]):c-d"; index blocks are "(IND):n", "(ETB0):n".
        let Some((logical, physical)) = item.strip_prefix('(').and_then(|s| s.split_once("):"))
        else {
            continue;
        };
        if logical.ends_with("[u]") || !logical.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let first = |s: &str| s.split('-').next().unwrap().parse::<u64>().unwrap();
        let last = |s: &str| s.split('-').next_back().unwrap().parse::<u64>().unwrap();
        let (f, d, n) = (
            first(logical),
            first(physical),
            last(logical) - first(logical) + 1,
        );
        assert_eq!(last(physical) - d + 1, n, "debugfs item {item}");
        match runs.last_mut() {
            Some((rf, rd, rn)) if *rf + *rn == f && *rd + *rn == d => *rn += n,
            _ => runs.push((f, d, n)),
        }
    }
    runs
}

/// The one block debugfs lists under `name` (IND, DIND, TIND) for a file.
fn debugfs_meta_block(img: &Path, path: &str, name: &str) -> u64 {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(img),
        &[0],
    );
    let tag = format!("({name}):");
    let at = out
        .find(&tag)
        .unwrap_or_else(|| panic!("no {tag} in {out}"));
    out[at + tag.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

// ---- source trees ----------------------------------------------------------------------

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(seed, 0, &mut v);
    v
}

fn put(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// A sparse file of `size` bytes with pattern data at `(offset, len)` ranges.
fn put_sparse(root: &Path, rel: &str, size: u64, data: &[(u64, usize)]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(100 + i as u64, len), off).unwrap();
    }
}

fn symlink(root: &Path, rel: &str, target: &str) {
    std::os::unix::fs::symlink(target, root.join(rel)).unwrap();
}

const DEEP: &str = "directory_level_one/directory_level_two/three/four/five/six/seven/eight";

/// The tree every image of the matrix is made from; returns the regular files in it.
fn common_tree(root: &Path) -> Vec<String> {
    put(root, "big", &pattern(1, 6 << 20));
    put(root, "odd", &pattern(2, 12345));
    put(root, "one_byte", b"x");
    put(root, "empty", b"");
    put(root, "exact", &pattern(3, 16384));
    // Holes at the start, in the middle and at the end; the data ends mid-block.
    put_sparse(
        root,
        "sparse",
        3 << 20,
        &[(64 << 10, 36 << 10), (1 << 20, 5000)],
    );
    put(root, &format!("{DEEP}/deepfile"), &pattern(4, 1000));
    // A fast symlink (fits in i_block), a slow one (does not), one to a directory.
    symlink(root, "link_rel", "odd");
    let long = format!("/{DEEP}/deepfile");
    assert!(
        long.len() >= 60,
        "the slow link target must not fit in i_block"
    );
    symlink(root, "link_abs_long", &long);
    symlink(root, "dirlink", "directory_level_one/directory_level_two");
    symlink(root, "loop_a", "loop_b");
    symlink(root, "loop_b", "loop_a");
    symlink(root, "dangling", "nothing_here");
    for i in 0..400 {
        put(
            root,
            &format!("many/entry_{i:04}"),
            format!("entry {i}\n").as_bytes(),
        );
    }
    vec![
        "big".into(),
        "odd".into(),
        "one_byte".into(),
        "empty".into(),
        "exact".into(),
        "sparse".into(),
        format!("{DEEP}/deepfile"),
        "many/entry_0000".into(),
        "many/entry_0399".into(),
    ]
}

// ---- a disk and a cache ----------------------------------------------------------------

fn pool(frames: usize) -> PagePool {
    let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
    PagePool::new(&dma, frames).unwrap()
}

type Dev = SharedDevice<RecordingDevice>;

/// The image on a recording device with `lba`-byte LBAs (only non-zero LBAs are stored).
fn load(img: &Path, lba: u32, pool: &PagePool) -> Dev {
    let data = fs::read(img).unwrap();
    let mut dev = RecordingDevice::new(pool.clone(), lba, data.len() as u64 / lba as u64);
    for (i, chunk) in data.chunks(lba as usize).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            dev.write_bytes(i as u64 * lba as u64, chunk);
        }
    }
    SharedDevice::new(dev)
}

struct Env {
    fs: ExtFs,
    cache: PageCache<Dev>,
    pool: PagePool,
}

fn env(img: &Path, lba: u32) -> Env {
    let pool = pool(4096);
    let dev = load(img, lba, &pool);
    let fs = ExtFs::open(Box::new(dev.share()), pool.clone()).expect("open the file system");
    let cache = PageCache::new(dev, pool.clone(), CacheOptions::default()).unwrap();
    Env { fs, cache, pool }
}

/// A file read through the cache, with what it took.
struct Read {
    data: Vec<u8>,
    inode: Inode,
    stats: CacheStats,
    meta: MetaStats,
}

fn cat(e: &mut Env, path: &str) -> Read {
    e.cache.reset_stats();
    let meta0 = e.fs.meta_stats();
    let inode =
        e.fs.lookup(path)
            .unwrap_or_else(|err| panic!("{path}: {err}"));
    let map = e.fs.file_map(&inode).unwrap();
    let f = e.cache.open(Box::new(map), inode.size).unwrap();
    let mut data = Vec::new();
    let n = copy_file(&mut e.cache, f, &mut data).unwrap_or_else(|err| panic!("{path}: {err}"));
    assert_eq!(n, inode.size);
    let stats = e.cache.stats();
    let meta = e.fs.meta_stats().since(&meta0);
    e.cache.close(f).unwrap();
    Read {
        data,
        inode,
        stats,
        meta,
    }
}

fn report(case: &str, r: &Read, l: &FileLayout) {
    println!(
        "{case}: {} bytes, {} ({} extents, {} hole blocks): {} read commands ({} fallback), \
         {} pages read, {} zeroed, {} metadata reads",
        r.inode.size,
        l.scheme,
        l.extents,
        l.hole_blocks,
        r.stats.read_commands,
        r.stats.fallback_commands,
        r.stats.pages_read,
        r.stats.pages_zeroed,
        r.meta.reads
    );
}

/// What the read path must do with a file of this layout: (fallback commands, least
/// number of multi-block commands). A page is read block by block when its blocks are not
/// one contiguous run followed only by holes; each of its mapped blocks is then a command.
fn expected(runs: &[(u64, u64, u64)], size: u64, bs: u64) -> (u64, u64) {
    let disk = |b: u64| {
        runs.iter()
            .find(|&&(f, _, n)| b >= f && b < f + n)
            .map(|&(f, d, _)| d + (b - f))
    };
    let bpp = PAGE_SIZE as u64 / bs;
    let eof = size.div_ceil(bs);
    let (mut fallback, mut commands) = (0, 0);
    // Disk block the previous good page ended before, if a command could continue.
    let mut open: Option<u64> = None;
    for p in 0..size.div_ceil(PAGE_SIZE as u64) {
        let blocks: Vec<Option<u64>> = (p * bpp..((p + 1) * bpp).min(eof)).map(disk).collect();
        let mapped = blocks.iter().take_while(|d| d.is_some()).count();
        let good = blocks[mapped..].iter().all(Option::is_none)
            && blocks[..mapped]
                .windows(2)
                .all(|w| w[0].unwrap() + 1 == w[1].unwrap());
        if !good {
            fallback += blocks.iter().flatten().count() as u64;
            open = None;
            continue;
        }
        if mapped == 0 {
            continue; // All hole: zeroed, and a command may go on past it.
        }
        let first = blocks[0].unwrap();
        if open != Some(first) {
            commands += 1;
        }
        let full = mapped as u64 == bpp;
        open = full.then(|| first + bpp);
    }
    (fallback, commands)
}

fn check_against_oracle(e: &mut Env, img: &Path, case: &str, path: &str, want: &[u8]) -> Read {
    let r = cat(e, path);
    assert!(
        r.data == want,
        "{case} {path}: data differs from the source file"
    );
    let layout = e.fs.layout(&r.inode).unwrap();
    if layout.scheme != "inline" {
        let oracle = debugfs_runs(img, path);
        assert_eq!(
            layout.runs, oracle,
            "{case} {path}: runs differ from debugfs"
        );
        let bs = e.fs.block_size() as u64;
        let (fallback, least) = expected(&oracle, r.inode.size, bs);
        assert_eq!(r.stats.fallback_commands, fallback, "{case} {path}");
        let multi = r.stats.read_commands - r.stats.fallback_commands;
        let windows = r.inode.size.div_ceil(COPY_CHUNK as u64);
        assert!(
            multi >= least && multi <= least + windows,
            "{case} {path}: {multi} multi-block commands, expected {least} to {}",
            least + windows
        );
    }
    report(&format!("{case} {path}"), &r, &layout);
    r
}

// ---- the matrix: ext2/3/4, 1/2/4 KiB blocks, descriptor and inode sizes ------------------

struct Variant {
    name: &'static str,
    kind: &'static str,
    bs: u32,
    opts: &'static [&'static str],
    lba: u32,
}

const MATRIX: &[Variant] = &[
    Variant {
        name: "ext4-4k-64bit",
        kind: "ext4",
        bs: 4096,
        opts: &["-O", "64bit"],
        lba: 512,
    },
    Variant {
        name: "ext4-4k-on-4k-lbas",
        kind: "ext4",
        bs: 4096,
        opts: &[],
        lba: 4096,
    },
    Variant {
        name: "ext4-1k-32bit",
        kind: "ext4",
        bs: 1024,
        opts: &["-O", "^64bit", "-I", "256"],
        lba: 512,
    },
    Variant {
        name: "ext4-2k-meta_bg",
        kind: "ext4",
        bs: 2048,
        opts: &["-O", "meta_bg,^resize_inode"],
        lba: 512,
    },
    Variant {
        name: "ext3-2k",
        kind: "ext3",
        bs: 2048,
        opts: &[],
        lba: 512,
    },
    Variant {
        name: "ext2-1k-128",
        kind: "ext2",
        bs: 1024,
        opts: &["-I", "128"],
        lba: 512,
    },
    Variant {
        name: "ext4-4k-inline",
        kind: "ext4",
        bs: 4096,
        opts: &["-O", "inline_data", "-I", "256"],
        lba: 512,
    },
];

fn matrix_case(v: &Variant) {
    let s = Scratch::new(v.name);
    let src = s.path("src");
    let files = common_tree(&src);
    let img = s.path("img");
    mkfs(&img, v.kind, v.bs, v.opts, &src, "24M");
    if v.opts.contains(&"inline_data") {
        // mke2fs 1.47.0 with inline_data cuts a sparse file's size back to the end of its
        // last data block (the trailing hole is lost); put the size back.
        let len = fs::metadata(src.join("sparse")).unwrap().len();
        debugfs_w(&img, &[format!("set_inode_field /sparse size {len}")]);
    }
    // Index the large directory (htree).
    run(
        Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&img),
        &[0, 1],
    );
    let mut e = env(&img, v.lba);
    let sb = e.fs.superblock();
    assert_eq!(sb.block_size, v.bs, "{}", v.name);
    assert_eq!(sb.kind(), v.kind, "{}", v.name);
    println!("{}: features {}", v.name, sb.feature_names().join(" "));

    for f in &files {
        let want = fs::read(src.join(f)).unwrap();
        check_against_oracle(&mut e, &img, v.name, &format!("/{f}"), &want);
    }

    // The large contiguous file goes out in few commands and no fallback: one extent
    // (or two) with extents; with indirect blocks a run ends at each pointer block.
    let big = cat(&mut e, "/big");
    let layout = e.fs.layout(&big.inode).unwrap();
    if layout.scheme == "extents" {
        assert!(
            layout.extents <= 2,
            "{}: big has {} runs",
            v.name,
            layout.extents
        );
    } else {
        let per_ind = (v.bs as u64 / 4) * v.bs as u64;
        assert!(
            layout.extents <= (6 << 20) / per_ind + 3,
            "{}: {} runs",
            v.name,
            layout.extents
        );
    }
    assert_eq!(big.stats.fallback_commands, 0);
    assert!(
        big.stats.read_commands <= 6 + layout.extents,
        "{}: {} commands for 6 MiB in {} runs",
        v.name,
        big.stats.read_commands,
        layout.extents
    );

    // Symbolic links: fast, slow (absolute), to a directory in the middle of a path.
    let deep = fs::read(src.join(DEEP).join("deepfile")).unwrap();
    assert_eq!(
        cat(&mut e, "/link_rel").data,
        fs::read(src.join("odd")).unwrap()
    );
    let slow = e.fs.lookup_nofollow("/link_abs_long").unwrap();
    assert!(slow.is_symlink() && !slow.is_fast_symlink());
    assert_eq!(cat(&mut e, "/link_abs_long").data, deep);
    assert!(e.fs.lookup_nofollow("/link_rel").unwrap().is_fast_symlink());
    let via = "dirlink/three/four/five/six/seven/eight/deepfile";
    assert_eq!(cat(&mut e, via).data, deep);
    assert_eq!(
        cat(&mut e, "/directory_level_one/./directory_level_two/../directory_level_two/three/four/five/six/seven/eight/deepfile").data,
        deep
    );
    assert!(matches!(
        e.fs.lookup("/loop_a"),
        Err(ExtError::SymlinkLoop { .. })
    ));
    assert!(matches!(
        e.fs.lookup("/dangling"),
        Err(ExtError::NotFound { .. })
    ));
    assert!(e.fs.lookup_nofollow("/dangling").unwrap().is_symlink());
    assert!(matches!(
        e.fs.lookup("/odd/x"),
        Err(ExtError::NotADirectory { .. })
    ));
    match e.fs.lookup("/many/entry_9999") {
        Err(ExtError::NotFound { path }) => assert_eq!(path, "/many/entry_9999"),
        other => panic!("{other:?}"),
    }

    // The htree directory, read linearly.
    let many = e.fs.lookup("/many").unwrap();
    assert!(
        many.has_flag(inode_flags::INDEX),
        "{}: e2fsck -D indexed it",
        v.name
    );
    let entries = e.fs.read_dir(&many).unwrap();
    let mut names: Vec<String> = entries
        .iter()
        .filter(|d| !d.is_dot())
        .map(DirEntry::name_lossy)
        .collect();
    names.sort();
    let want: Vec<String> = (0..400).map(|i| format!("entry_{i:04}")).collect();
    assert_eq!(names, want);
    for i in [1, 137, 398] {
        let r = cat(&mut e, &format!("many/entry_{i:04}"));
        assert_eq!(r.data, format!("entry {i}\n").as_bytes());
    }

    // Inline data where the feature is on.
    if v.opts.contains(&"inline_data") {
        for f in ["one_byte", "many/entry_0005"] {
            assert!(e.fs.lookup(f).unwrap().is_inline(), "{f} should be inline");
        }
        assert!(!e.fs.lookup("odd").unwrap().is_inline());
        let deepdir = e.fs.lookup(&format!("/{DEEP}")).unwrap();
        assert!(deepdir.is_inline(), "a small directory is inline");
        assert_eq!(
            e.fs.read_dir(&deepdir)
                .unwrap()
                .iter()
                .map(DirEntry::name_lossy)
                .collect::<Vec<_>>(),
            [".", "..", "deepfile"]
        );
    }

    // Nothing was ever written.
    let writes = e
        .cache
        .device()
        .with_device(|d| d.commands().iter().filter(|c| c.op == IoOp::Write).count());
    assert_eq!(writes, 0, "{}: the reader wrote to the disk", v.name);
}

#[test]
fn matrix_ext4_4k_64bit() {
    matrix_case(&MATRIX[0]);
}

#[test]
fn matrix_ext4_4k_on_4k_lbas() {
    matrix_case(&MATRIX[1]);
}

#[test]
fn matrix_ext4_1k_32bit() {
    matrix_case(&MATRIX[2]);
}

#[test]
fn matrix_ext4_2k_meta_bg() {
    matrix_case(&MATRIX[3]);
}

#[test]
fn matrix_ext3_2k() {
    matrix_case(&MATRIX[4]);
}

#[test]
fn matrix_ext2_1k_128_byte_inodes() {
    matrix_case(&MATRIX[5]);
}

#[test]
fn matrix_ext4_inline_data() {
    let v = &MATRIX[6];
    matrix_case(v);
    // Small files with inline data, in i_block alone and spilling into system.data.
    let s = Scratch::new("inline");
    let src = s.path("src");
    put(&src, "tiny", &pattern(7, 40));
    put(&src, "spill", &pattern(8, 100));
    put(&src, "dir/a", b"a");
    let img = s.path("img");
    mkfs(&img, v.kind, v.bs, v.opts, &src, "8M");
    let mut e = env(&img, 512);
    for (name, len) in [("/tiny", 40), ("/spill", 100)] {
        let r = cat(&mut e, name);
        assert!(r.inode.is_inline(), "{name}");
        assert_eq!(r.data, pattern(if len == 40 { 7 } else { 8 }, len));
        assert_eq!(
            r.stats.read_commands, 0,
            "{name}: inline data needs no data read"
        );
        assert_eq!(r.stats.pages_read, 0);
        let layout = e.fs.layout(&r.inode).unwrap();
        assert_eq!((layout.scheme, layout.extents), ("inline", 0));
        report(&format!("inline {name}"), &r, &layout);
    }
    assert_eq!(cat(&mut e, "/dir/a").data, b"a");
}

// ---- ext2 indirect blocks and BH_Boundary -------------------------------------------------

#[test]
fn ext2_indirect_blocks_boundary_and_triple_indirect() {
    let s = Scratch::new("ext2-ind");
    let src = s.path("src");
    // > 12 blocks: direct, single and double indirect at 1 KiB blocks (12 + 256 = 268).
    put(&src, "ind", &pattern(10, 400 * 1024 + 77));
    // Past 12 + 256 + 256 * 256 blocks (~64.3 MiB): triple indirect, cheaply sparse.
    let tind_at = (12 + 256 + 256 * 256 + 300) * 1024u64;
    put_sparse(
        &src,
        "huge_sparse",
        tind_at + (2 << 20),
        &[(5 * 1024, 20 * 1024), (tind_at, 50_000)],
    );
    let img = s.path("img");
    mkfs(&img, "ext2", 1024, &[], &src, "16M");
    let mut e = env(&img, 512);

    let want = fs::read(src.join("ind")).unwrap();
    let r = check_against_oracle(&mut e, &img, "ext2-1k", "/ind", &want);
    assert!(!r.inode.has_flag(inode_flags::EXTENTS));

    // BH_Boundary: the data of blocks 0-11 goes out before the indirect block is read,
    // and the data under the first indirect block before the double indirect ones.
    let runs = debugfs_runs(&img, "/ind");
    let ind = debugfs_meta_block(&img, "/ind", "IND");
    let dind = debugfs_meta_block(&img, "/ind", "DIND");
    let lpb = 2; // LBAs per 1 KiB block
    let disk = |b: u64| {
        runs.iter()
            .find(|&&(f, _, n)| b >= f && b < f + n)
            .map(|&(f, d, _)| d + (b - f))
            .unwrap()
    };
    let cmds = e.cache.device().with_device(|d| d.commands().to_vec());
    let pos = |lba: u64| {
        cmds.iter()
            .position(|c| c.op == IoOp::Read && c.slba == lba && c.pages.is_empty())
            .unwrap_or_else(|| panic!("no metadata read of LBA {lba}"))
    };
    let data_ending_at = |block: u64| {
        cmds.iter()
            .position(|c| {
                c.op == IoOp::Read
                    && !c.pages.is_empty()
                    && c.slba + c.lbas as u64 == (disk(block) + 1) * lpb
            })
            .unwrap_or_else(|| panic!("no data command ending with file block {block}"))
    };
    let (ind_read, dind_read) = (pos(ind * lpb), pos(dind * lpb));
    assert!(
        data_ending_at(11) < ind_read,
        "blocks 0-11 are submitted before the indirect block is read"
    );
    assert!(
        data_ending_at(12 + 255) < dind_read,
        "blocks under the indirect block are submitted before the double indirect block is read"
    );
    let first_after = cmds[ind_read + 1..]
        .iter()
        .find(|c| !c.pages.is_empty())
        .unwrap();
    assert_eq!(first_after.slba, disk(12) * lpb, "then block 12 follows");

    let want = fs::read(src.join("huge_sparse")).unwrap();
    let r = check_against_oracle(&mut e, &img, "ext2-1k", "/huge_sparse", &want);
    let layout = e.fs.layout(&r.inode).unwrap();
    assert!(layout.hole_blocks > 65_000, "mostly holes");
    assert!(
        r.stats.pages_zeroed > 16_000,
        "holes are zeroed without I/O ({} pages)",
        r.stats.pages_zeroed
    );
    let tind = debugfs_meta_block(&img, "/huge_sparse", "TIND") * lpb;
    let read = e.cache.device().with_device(|d| {
        d.commands()
            .iter()
            .any(|c| c.slba == tind && c.pages.is_empty())
    });
    assert!(read, "the triple indirect block was read");
}

// ---- fragmentation, extent tree depth, uninitialised extents ---------------------------

fn fragmented(bs: u32) {
    let s = Scratch::new(&format!("frag-{bs}"));
    let src = s.path("src");
    // Fill a small file system with small files, free every other one, then write a big
    // file into the gaps.
    let per = 2 * bs as usize;
    let count = (5 << 20) / per;
    for i in 0..count {
        put(&src, &format!("fill/f{i}"), &pattern(i as u64, per));
    }
    let img = s.path("img");
    mkfs(
        &img,
        "ext4",
        bs,
        &["-N", &(count + 200).to_string(), "-O", "^has_journal"],
        &src,
        "8M",
    );
    let big_len = if bs == 1024 { 900_000 } else { 700_000 };
    let big = s.path("big");
    fs::write(&big, pattern(999, big_len)).unwrap();
    let mut cmds: Vec<String> = (0..count)
        .step_by(2)
        .map(|i| format!("rm /fill/f{i}"))
        .collect();
    cmds.push(format!("write {} big", big.display()));
    debugfs_w(&img, &cmds);

    let mut e = env(&img, 512);
    let case = format!("ext4-{bs}-fragmented");
    let r = check_against_oracle(&mut e, &img, &case, "/big", &fs::read(&big).unwrap());
    let layout = e.fs.layout(&r.inode).unwrap();
    let blocks = big_len as u64 / bs as u64;
    assert!(
        layout.extents > blocks / 4,
        "{case}: only {} runs for {blocks} blocks",
        layout.extents
    );
    let depth = u16::from_le_bytes([r.inode.block[6], r.inode.block[7]]);
    println!("{case}: extent tree depth {depth}");
    if bs == 1024 {
        assert_eq!(depth, 2, "{case}: the tree has index nodes and leaves");
        assert!(
            r.stats.fallback_commands > 0,
            "pages spanning fragments go block by block"
        );
    } else {
        assert!(depth >= 1);
        assert_eq!(
            r.stats.fallback_commands, 0,
            "a block per page: never confused"
        );
    }
    // The remaining small files are intact.
    for i in [1, count / 2 + 1, count - 1] {
        let i = i | 1;
        if i < count {
            assert_eq!(
                cat(&mut e, &format!("/fill/f{i}")).data,
                pattern(i as u64, per)
            );
        }
    }
}

#[test]
fn fragmented_file_1k_blocks_depth_two_tree() {
    fragmented(1024);
}

#[test]
fn fragmented_file_4k_blocks() {
    fragmented(4096);
}

#[test]
fn uninitialised_extents_read_as_zeros() {
    let s = Scratch::new("uninit");
    let src = s.path("src");
    put_sparse(
        &src,
        "f",
        400 << 10,
        &[(0, 40 << 10), (200 << 10, 50 << 10)],
    );
    let img = s.path("img");
    mkfs(&img, "ext4", 4096, &[], &src, "8M");
    // Preallocate the middle hole (blocks 10-49) and a tail beyond it: uninitialised.
    debugfs_w(
        &img,
        &["fallocate /f 10 49".into(), "fallocate /f 70 99".into()],
    );
    // Stale data in the preallocated blocks must not show.
    let stat = run(
        Command::new("debugfs").args(["-R", "stat /f"]).arg(&img),
        &[0],
    );
    assert!(
        stat.contains("[u]"),
        "debugfs made uninitialised extents: {stat}"
    );
    let mut e = env(&img, 512);
    let first_uninit = {
        let at = stat.find("[u]):").unwrap() + 5;
        stat[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    e.cache.device().with_device(|d| {
        d.write_bytes(first_uninit * 4096, &[0xAB; 4096]);
    });
    let want = fs::read(src.join("f")).unwrap();
    let r = check_against_oracle(&mut e, &img, "ext4-uninit", "/f", &want);
    let layout = e.fs.layout(&r.inode).unwrap();
    assert_eq!(
        layout.mapped_blocks,
        10 + 13,
        "uninitialised blocks are not data"
    );
}

// ---- planning a read (rnvme ls -l) -------------------------------------------------------

#[test]
fn a_planned_read_issues_what_the_real_read_issues() {
    let s = Scratch::new("plan");
    let src = s.path("src");
    put(&src, "contig", &pattern(1, 3 << 20));
    put_sparse(&src, "sparse", 2 << 20, &[(3000, 9000), (1 << 20, 70_000)]);
    put(&src, "odd", &pattern(2, 5555));
    for bs in [1024u32, 4096] {
        let img = s.path(&format!("img{bs}"));
        mkfs(&img, "ext2", bs, &[], &src, "16M");
        for f in ["/contig", "/sparse", "/odd"] {
            // Cold metadata caches on both sides, as for `rnvme ls -l` then `rnvme cat`.
            let planner = env(&img, 512);
            let inode = planner.fs.lookup(f).unwrap();
            let free = planner.pool.free_frames();
            let plan = planner
                .fs
                .plan_read(&inode, &planner.pool, CacheOptions::default())
                .unwrap();
            assert_eq!(
                planner.pool.free_frames(),
                free,
                "the plan gives its frames back"
            );
            let planned = planner
                .cache
                .device()
                .with_device(|d| d.commands().iter().filter(|c| !c.pages.is_empty()).count());
            assert_eq!(planned, 0, "planning reads no file data");
            let mut reader = env(&img, 512);
            let real = cat(&mut reader, f);
            assert_eq!(
                (
                    plan.read_commands,
                    plan.fallback_commands,
                    plan.pages_read,
                    plan.pages_zeroed
                ),
                (
                    real.stats.read_commands,
                    real.stats.fallback_commands,
                    real.stats.pages_read,
                    real.stats.pages_zeroed
                ),
                "ext2 {bs} {f}"
            );
            assert!(plan.read_commands > 0);
        }
    }
}

// ---- refusals -------------------------------------------------------------------------

fn open_err(img: &Path, lba: u32) -> ExtError {
    let pool = pool(8);
    let dev = load(img, lba, &pool);
    ExtFs::open(Box::new(dev), pool).expect_err("the file system must be refused")
}

#[test]
fn refusals_are_clear() {
    let s = Scratch::new("refuse");
    let src = s.path("src");
    put(&src, "secret", &pattern(5, 5000));
    put(&src, "plain", b"plain\n");
    let img = s.path("img");
    mkfs(&img, "ext4", 1024, &["-O", "encrypt"], &src, "8M");

    // 1 KiB blocks on 4 KiB LBAs.
    let e = open_err(&img, 4096).to_string();
    assert!(
        e.contains("1024-byte blocks") && e.contains("4096-byte LBAs"),
        "{e}"
    );

    // An encrypted inode.
    debugfs_w(&img, &["set_inode_field /secret flags 0x80800".into()]);
    let mut env1 = env(&img, 512);
    let secret = env1.fs.lookup("/secret").unwrap();
    let e = env1.fs.file_map(&secret).unwrap_err().to_string();
    assert!(e.contains("encrypted"), "{e}");
    assert_eq!(cat(&mut env1, "/plain").data, b"plain\n");
    drop(env1);

    // A journal that needs recovery.
    debugfs_w(&img, &["feature needs_recovery".into()]);
    let e = open_err(&img, 512);
    assert!(matches!(e, ExtError::NeedsRecovery { .. }), "{e}");
    assert!(e.to_string().contains("e2fsck"), "{e}");

    // Unknown incompatible features, named.
    let s2 = Scratch::new("refuse2");
    let img2 = s2.path("img");
    mkfs(&img2, "ext4", 4096, &[], &src, "8M");
    let mut raw = fs::read(&img2).unwrap();
    let at = 1024 + 0x60;
    let mut inc = u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    inc |= incompat::DIRDATA | 0x4000_0000;
    raw[at..at + 4].copy_from_slice(&inc.to_le_bytes());
    fs::write(&img2, &raw).unwrap();
    let e = open_err(&img2, 512).to_string();
    assert!(
        e.contains("dirdata") && e.contains("unknown incompatible feature 0x40000000"),
        "{e}"
    );

    // Not an ext file system at all.
    fs::write(&img2, vec![0u8; 1 << 20]).unwrap();
    assert!(matches!(
        open_err(&img2, 512),
        ExtError::NotExt { found: 0, .. }
    ));
}

#[test]
fn the_map_never_allocates_or_truncates() {
    let s = Scratch::new("ro");
    let src = s.path("src");
    put(&src, "f", &pattern(1, 10_000));
    let img = s.path("img");
    mkfs(&img, "ext4", 4096, &[], &src, "8M");
    let e = env(&img, 512);
    let inode = e.fs.lookup("f").unwrap();
    let mut map = e.fs.file_map(&inode).unwrap();
    assert!(map
        .map(5, 1, true)
        .unwrap_err()
        .to_string()
        .contains("read-only"));
    assert!(map.truncate(0).is_err());
    assert!(matches!(
        map.map(0, 10, false).unwrap(),
        Mapping::Mapped { blocks: 3, .. }
    ));
}

#[test]
fn metadata_reads_are_counted_and_cached() {
    let s = Scratch::new("meta");
    let src = s.path("src");
    put(&src, "a/b/c", b"abc");
    let img = s.path("img");
    mkfs(&img, "ext4", 4096, &[], &src, "8M");
    let e = env(&img, 512);
    let before = e.fs.meta_stats();
    e.fs.lookup("/a/b/c").unwrap();
    let first = e.fs.meta_stats().since(&before);
    assert!(
        first.reads >= 3,
        "directories and inodes were read: {first:?}"
    );
    assert_eq!(first.bytes, first.reads * 4096, "one block per read");
    let cmds = e.cache.device().with_device(|d| d.commands().len());
    let mid = e.fs.meta_stats();
    e.fs.lookup("/a/b/c").unwrap();
    let again = e.fs.meta_stats().since(&mid);
    assert_eq!(
        again.reads, 0,
        "the second lookup is served from the block cache"
    );
    assert!(again.cache_hits > 0);
    assert_eq!(e.cache.device().with_device(|d| d.commands().len()), cmds);
}
