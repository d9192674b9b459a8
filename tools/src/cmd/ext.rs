//! `rnvme ls`, `rnvme cat` and `rnvme cp`: read files from an ext2/ext3/ext4 namespace
//! through the mpage page cache, without the kernel.
//!
//! One I/O queue pair carries everything: the cache and the file system's metadata reader
//! each hold a handle of a [`SharedDevice`], which routes completions back to whoever
//! submitted the command. Nothing is ever written to the namespace.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use rnvme_driver::controller::Controller;
use rnvme_mpage::ext::{copy_file, CopyError, ExtFs, FileType, Inode, MetaStats, SharedDevice};
use rnvme_mpage::{BlockIo, CacheOptions, CacheStats, NvmeBlockIo, PageCache, PagePool};

use super::device::DeviceArgs;
use super::{out, outln, UsageError};

/// Frames of the page pool (8 MiB: four 2 MiB hugepages).
const POOL_FRAMES: usize = 2048;

/// The cache settings of `cat` and `cp`, which `ls -l` plans with too.
fn cache_options() -> CacheOptions {
    CacheOptions::default()
}

/// Which controller and namespace.
#[derive(Args, Debug, Clone)]
pub struct FsArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Namespace id
    #[arg(long = "ns", default_value_t = 1)]
    pub nsid: u32,
}

/// `rnvme ls`
#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub fs: FsArgs,
    /// Also show each file's extent count and the NVMe commands a full read takes
    #[arg(short = 'l')]
    pub long: bool,
    /// A directory (its entries are listed) or a file, from the root of the file system
    #[arg(default_value = "/")]
    pub path: String,
}

/// `rnvme cat`
#[derive(Args, Debug)]
pub struct CatArgs {
    #[command(flatten)]
    pub fs: FsArgs,
    /// The file, from the root of the file system
    pub path: String,
    /// Print the pages read, commands issued, fallbacks and metadata reads to stderr
    #[arg(long)]
    pub stats: bool,
}

/// `rnvme cp`
#[derive(Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    pub fs: FsArgs,
    /// The file, from the root of the file system
    pub path: String,
    /// Where to write it (a directory keeps the file's name)
    pub dest: PathBuf,
    /// Print the pages read, commands issued, fallbacks and metadata reads
    #[arg(long)]
    pub stats: bool,
}

/// An open file system and a page cache on one namespace.
struct Session {
    fs: ExtFs,
    cache: PageCache<SharedDevice<NvmeBlockIo>>,
    pool: PagePool,
    /// Declared last: dropped after the queue pair the cache holds.
    _ctrl: Controller,
}

impl Session {
    fn open(a: &FsArgs) -> Result<Session> {
        let ctrl = a.dev.open()?;
        let ns = ctrl
            .namespace(a.nsid)
            .cloned()
            .map_err(|e| UsageError(e.to_string()))?;
        let qp = ctrl.create_io_qpair(ctrl.max_queue_entries().min(64))?;
        let io = NvmeBlockIo::for_namespace(qp, ns.nsid)?;
        let pool = PagePool::new(ctrl.pool(), POOL_FRAMES)
            .context("take DMA memory for the page cache (is `rnvme setup` done?)")?;
        let shared = SharedDevice::new(io);
        let fs = ExtFs::open(Box::new(shared.share()), pool.clone())?;
        let cache = PageCache::new(shared, pool.clone(), cache_options())?;
        Ok(Session {
            fs,
            cache,
            pool,
            _ctrl: ctrl,
        })
    }
}

/// The regular file at `path`, or a usage error saying what it is instead.
fn regular_file(fs: &ExtFs, path: &str) -> Result<Inode> {
    let inode = fs.lookup(path)?;
    match inode.file_type() {
        FileType::Regular => Ok(inode),
        FileType::Directory => {
            Err(UsageError(format!("{path} is a directory; list it with `rnvme ls`")).into())
        }
        other => Err(UsageError(format!("{path} is a {other}, not a regular file")).into()),
    }
}

/// Read the file at `path` through `cache` into `out`. Returns its size and what the read
/// took: cache counters and metadata reads (path lookup included).
fn read_file<D: BlockIo>(
    fs: &ExtFs,
    cache: &mut PageCache<D>,
    path: &str,
    out: &mut dyn Write,
) -> Result<(u64, CacheStats, MetaStats)> {
    let meta0 = fs.meta_stats();
    let stats0 = cache.stats();
    let inode = regular_file(fs, path)?;
    let map = fs.file_map(&inode)?;
    let f = cache.open(Box::new(map), inode.size)?;
    let n = copy_file(cache, f, out)?;
    let stats = cache.stats();
    let since = CacheStats {
        pages_read: stats.pages_read - stats0.pages_read,
        pages_zeroed: stats.pages_zeroed - stats0.pages_zeroed,
        commands: stats.commands - stats0.commands,
        read_commands: stats.read_commands - stats0.read_commands,
        fallback_commands: stats.fallback_commands - stats0.fallback_commands,
        map_calls: stats.map_calls - stats0.map_calls,
        readahead_windows: stats.readahead_windows - stats0.readahead_windows,
        ..CacheStats::default()
    };
    Ok((n, since, fs.meta_stats().since(&meta0)))
}

/// The `--stats` line.
fn stats_line(bytes: u64, s: &CacheStats, m: &MetaStats) -> String {
    format!(
        "{bytes} bytes: {} pages read, {} pages zeroed (holes), {} read commands ({} per-block \
         fallbacks), {} map calls, {} metadata reads ({} bytes, {} served from the metadata cache)",
        s.pages_read,
        s.pages_zeroed,
        s.read_commands,
        s.fallback_commands,
        s.map_calls,
        m.reads,
        m.bytes,
        m.cache_hits
    )
}

/// A write error that only means the reader of our output went away.
fn broken_pipe(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<CopyError>(),
        Some(CopyError::Write(io)) if io.kind() == std::io::ErrorKind::BrokenPipe
    )
}

/// `rnvme cat`.
pub fn cat(a: CatArgs) -> Result<ExitCode> {
    let mut s = Session::open(&a.fs)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let r = read_file(&s.fs, &mut s.cache, &a.path, &mut out).and_then(|r| {
        out.flush()
            .map(|()| r)
            .map_err(|e| CopyError::Write(e).into())
    });
    let (n, st, meta) = match r {
        Ok(r) => r,
        Err(e) if broken_pipe(&e) => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e.context(format!("cat {}", a.path))),
    };
    if a.stats {
        eprintln!("{}: {}", a.path, stats_line(n, &st, &meta));
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `cp PATH DEST` writes: DEST, or DEST/name when DEST is a directory.
fn destination(path: &str, dest: &Path) -> Result<PathBuf> {
    if !dest.is_dir() {
        return Ok(dest.to_path_buf());
    }
    let name = path
        .rsplit('/')
        .find(|c| !c.is_empty() && *c != "." && *c != "..")
        .ok_or_else(|| UsageError(format!("{path} names no file to copy into a directory")))?;
    Ok(dest.join(name))
}

/// `rnvme cp`.
pub fn cp(a: CpArgs) -> Result<ExitCode> {
    let dest = destination(&a.path, &a.dest)?;
    let mut s = Session::open(&a.fs)?;
    // Look the file up before creating the destination, so a bad path leaves nothing.
    regular_file(&s.fs, &a.path)?;
    let file = File::create(&dest).with_context(|| format!("create {}", dest.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let (n, st, meta) = read_file(&s.fs, &mut s.cache, &a.path, &mut out)
        .with_context(|| format!("copy {} to {}", a.path, dest.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("write {}", dest.display()))?;
    outln!("{} -> {}: {n} bytes", a.path, dest.display())?;
    if a.stats {
        outln!("{}: {}", a.path, stats_line(n, &st, &meta))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    name: String,
    kind: FileType,
    size: u64,
    /// The symlink's target.
    target: Option<String>,
    /// With `-l`, for regular files: (extents, inline, read commands, per-block fallbacks).
    plan: Option<(u64, bool, u64, u64)>,
}

/// The rows for `path`: a directory's entries (without `.` and `..`), sorted by name, or
/// the one file it names.
fn list(fs: &ExtFs, pool: &PagePool, path: &str, long: bool) -> Result<Vec<Row>> {
    let inode = fs.lookup(path)?;
    let entries: Vec<(String, u32)> = if inode.is_dir() {
        let mut v: Vec<(String, u32)> = fs
            .read_dir(&inode)?
            .into_iter()
            .filter(|e| !e.is_dot())
            .map(|e| (e.name_lossy(), e.ino))
            .collect();
        v.sort();
        v
    } else {
        let name = path.rsplit('/').find(|c| !c.is_empty()).unwrap_or("/");
        vec![(name.to_string(), inode.ino)]
    };
    let mut rows = Vec::with_capacity(entries.len());
    for (name, ino) in entries {
        let i = fs.inode(ino)?;
        let kind = i.file_type();
        let target = if kind == FileType::Symlink {
            Some(match fs.read_link(&i) {
                Ok(t) => String::from_utf8_lossy(&t).into_owned(),
                Err(e) => format!("(unreadable: {e})"),
            })
        } else {
            None
        };
        let plan = if long && kind == FileType::Regular && !i.is_encrypted() {
            // Plan first: the walk of the layout caches the file's index and indirect
            // blocks, and a cached one sets no boundary, unlike in a fresh `cat`.
            let cmds = fs
                .plan_read(&i, pool, cache_options())
                .with_context(|| format!("plan a read of {name}"))?;
            let layout = fs.layout(&i)?;
            Some((
                layout.extents,
                layout.scheme == "inline",
                cmds.read_commands,
                cmds.fallback_commands,
            ))
        } else {
            None
        };
        rows.push(Row {
            name,
            kind,
            size: i.size,
            target,
            plan,
        });
    }
    Ok(rows)
}

/// The listing as text.
fn format_rows(rows: &[Row], long: bool) -> String {
    let mut s = String::new();
    if long {
        s.push_str(&format!(
            "{:<8} {:>12} {:>8} {:>9} {:>9}  NAME\n",
            "TYPE", "SIZE", "EXTENTS", "COMMANDS", "PER-BLOCK"
        ));
    } else {
        s.push_str(&format!("{:<8} {:>12}  NAME\n", "TYPE", "SIZE"));
    }
    for r in rows {
        let name = match &r.target {
            Some(t) => format!("{} -> {t}", r.name),
            None => r.name.clone(),
        };
        if long {
            let (ext, cmds, fb) = match r.plan {
                Some((_, true, c, f)) => ("inline".to_string(), c.to_string(), f.to_string()),
                Some((e, false, c, f)) => (e.to_string(), c.to_string(), f.to_string()),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "{:<8} {:>12} {:>8} {:>9} {:>9}  {name}\n",
                r.kind.name(),
                r.size,
                ext,
                cmds,
                fb
            ));
        } else {
            s.push_str(&format!("{:<8} {:>12}  {name}\n", r.kind.name(), r.size));
        }
    }
    s
}

/// `rnvme ls`.
pub fn ls(a: LsArgs) -> Result<ExitCode> {
    let s = Session::open(&a.fs)?;
    let rows = list(&s.fs, &s.pool, &a.path, a.long).with_context(|| format!("ls {}", a.path))?;
    out!("{}", format_rows(&rows, a.long))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use rnvme_driver::dma::{Backing, DmaPool};
    use rnvme_driver::hw::MemoryOnly;
    use rnvme_mpage::RecordingDevice;
    use std::process::Command;
    use std::sync::Arc;

    #[derive(Debug, Parser)]
    enum T {
        Ls(LsArgs),
        Cat(CatArgs),
        Cp(CpArgs),
    }

    fn parse(args: &[&str]) -> Result<T, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
    }

    #[test]
    fn arguments() {
        let T::Ls(a) = parse(&["ls", "0000:00:04.0", "--ns", "2", "-l", "/etc"]).unwrap() else {
            panic!()
        };
        assert_eq!((a.fs.nsid, a.long, a.path.as_str()), (2, true, "/etc"));
        assert_eq!(a.fs.dev.bdf, "0000:00:04.0");
        let T::Ls(a) = parse(&["ls", "0000:00:04.0"]).unwrap() else {
            panic!()
        };
        assert_eq!((a.fs.nsid, a.long, a.path.as_str()), (1, false, "/"));
        let T::Cat(a) = parse(&["cat", "0000:00:04.0", "/a/b", "--stats"]).unwrap() else {
            panic!()
        };
        assert!(a.stats && a.path == "/a/b");
        let T::Cp(a) = parse(&["cp", "0000:00:04.0", "--ns", "3", "/x", "/tmp/y"]).unwrap() else {
            panic!()
        };
        assert_eq!((a.fs.nsid, a.dest), (3, PathBuf::from("/tmp/y")));
        assert!(parse(&["cat", "0000:00:04.0"]).is_err(), "cat needs a path");
        assert!(
            parse(&["cp", "0000:00:04.0", "/x"]).is_err(),
            "cp needs a destination"
        );
        assert!(parse(&["ls", "00:04.0", "/"]).is_err(), "short BDF");
    }

    #[test]
    fn destination_keeps_the_name_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            destination("/a/b.txt", dir.path()).unwrap(),
            dir.path().join("b.txt")
        );
        assert_eq!(
            destination("/a/b/", dir.path()).unwrap(),
            dir.path().join("b")
        );
        let f = dir.path().join("new");
        assert_eq!(destination("/a/b", &f).unwrap(), f);
        assert!(destination("/", dir.path()).is_err());
    }

    /// An ext4 image made by mke2fs from a small tree, on a recording device.
    fn image() -> (
        tempfile::TempDir,
        ExtFs,
        PageCache<SharedDevice<RecordingDevice>>,
        PagePool,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(src.join("big"), &big).unwrap();
        std::fs::write(src.join("sub/small"), b"hello\n").unwrap();
        std::os::unix::fs::symlink("sub/small", src.join("link")).unwrap();
        let img = dir.path().join("img");
        let st = Command::new("mke2fs")
            .args(["-F", "-q", "-t", "ext4", "-b", "4096", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("8M")
            .status()
            .expect("run mke2fs (the tests need e2fsprogs)");
        assert!(st.success());
        let data = std::fs::read(&img).unwrap();
        let dma = DmaPool::new(Arc::new(MemoryOnly), Backing::SmallPages, 0).unwrap();
        let pool = PagePool::new(&dma, 512).unwrap();
        let mut dev = RecordingDevice::new(pool.clone(), 512, data.len() as u64 / 512);
        dev.write_bytes(0, &data);
        let shared = SharedDevice::new(dev);
        let fs = ExtFs::open(Box::new(shared.share()), pool.clone()).unwrap();
        let cache = PageCache::new(shared, pool.clone(), cache_options()).unwrap();
        (dir, fs, cache, pool)
    }

    #[test]
    fn listing_and_reading_an_image() {
        let (dir, fs, mut cache, pool) = image();
        let rows = list(&fs, &pool, "/", true).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["big", "link", "lost+found", "sub"]);
        let big = &rows[0];
        assert_eq!((big.kind, big.size), (FileType::Regular, 300_000));
        let (extents, inline, cmds, fallback) = big.plan.unwrap();
        assert!(!inline && extents == 1 && fallback == 0);
        assert_eq!(cmds, 1, "74 contiguous pages in one command");
        assert_eq!(rows[1].target.as_deref(), Some("sub/small"));
        assert_eq!(rows[3].kind, FileType::Directory);
        assert!(rows[3].plan.is_none());
        let text = format_rows(&rows, true);
        assert!(text.starts_with("TYPE"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["file", "300000", "1", "1", "0", "big"]),
            "{text}"
        );
        assert!(text.contains("link -> sub/small"), "{text}");
        let short = format_rows(&list(&fs, &pool, "/sub", false).unwrap(), false);
        assert_eq!(
            short
                .lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["file", "6", "small"]
        );

        let mut out = Vec::new();
        let (n, st, _) = read_file(&fs, &mut cache, "/big", &mut out).unwrap();
        let want = std::fs::read(dir.path().join("src/big")).unwrap();
        assert!(n == 300_000 && out == want);
        assert_eq!(st.read_commands, cmds, "the plan matched the read");
        let line = stats_line(n, &st, &MetaStats::default());
        assert!(
            line.contains("74 pages read") && line.contains("1 read commands"),
            "{line}"
        );
        let mut out = Vec::new();
        read_file(&fs, &mut cache, "/link", &mut out).unwrap();
        assert_eq!(out, b"hello\n");
        let e = read_file(&fs, &mut cache, "/sub", &mut Vec::new()).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some() && e.to_string().contains("directory"));
        let e = read_file(&fs, &mut cache, "/nope", &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("/nope: no such file"), "{e}");
    }
}
