//! A read-only ext2/ext3/ext4 reader over a [`BlockIo`], feeding the page cache.
//!
//! [`ExtFs::open`] reads the superblock through a metadata reader (synchronous reads with a
//! bounce frame from the [`PagePool`], counted in [`MetaStats`]); [`ExtFs::lookup`] walks
//! paths through directories and symbolic links; [`ExtFs::file_map`] gives an
//! [`ExtFileMap`], the [`crate::BlockMap`] of one inode, to open the file in a
//! [`PageCache`]. Metadata is read through the same device as the data: wrap the device in a
//! [`SharedDevice`] and give one handle to the file system, the other to the cache (its
//! docs say why this design).
//!
//! ```no_run
//! # use rnvme_mpage::{*, ext::*};
//! # fn demo(dev: RecordingDevice, pool: PagePool) -> Result<(), Box<dyn std::error::Error>> {
//! let shared = SharedDevice::new(dev);
//! let fs = ExtFs::open(Box::new(shared.share()), pool.clone())?;
//! let mut cache = PageCache::new(shared, pool, CacheOptions::default())?;
//! let inode = fs.lookup("/etc/hostname")?;
//! let f = cache.open(Box::new(fs.file_map(&inode)?), inode.size)?;
//! let mut out = Vec::new();
//! copy_file(&mut cache, f, &mut out)?;
//! # Ok(()) }
//! ```
//!
//! Supported: 1, 2 and 4 KiB blocks (a whole number of LBAs each), 32- and 64-bit group
//! descriptors, `meta_bg`, `flex_bg`, `sparse_super`, 128- and 256-byte inodes, extent trees
//! of any depth, indirect blocks, holes, inline data, linear and htree directories (read
//! linearly), fast and slow symlinks. Refused with a clear error: a journal that needs
//! recovery, unknown incompatible features, encrypted files. Nothing is ever written.

mod copy;
mod dir;
mod filemap;
mod inode;
mod io;
mod le;
mod superblock;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

pub use copy::{copy_file, CopyError, COPY_CHUNK};
pub use dir::DirEntry;
pub use filemap::ExtFileMap;
pub use inode::{flags as inode_flags, FileType, Inode, ROOT_INO};
pub use io::{MetaStats, PlanDevice, SharedDevice};
pub use superblock::{compat, incompat, ro_compat, Superblock};

use crate::backend::{BlockIo, IoError};
use crate::cache::{CacheOptions, CacheStats, PageCache};
use crate::error::MpageError;
use crate::map::Mapping;
use crate::pool::PagePool;
use io::MetaReader;
use superblock::{SuperError, MAGIC_AT, SUPERBLOCK_LEN, SUPERBLOCK_OFFSET};

/// Symbolic links followed in one lookup before giving up (Linux's limit).
pub const MAX_SYMLINKS: u32 = 40;

/// Why the file system or a file in it cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ExtError {
    /// A metadata read failed.
    #[error("{dev}: reading {len} bytes of metadata at byte {offset}: {source}")]
    Io {
        dev: String,
        offset: u64,
        len: usize,
        #[source]
        source: IoError,
    },
    /// A metadata read never completed.
    #[error("{dev}: no completion for the metadata read at byte {offset} within {ms} ms; the device may be hung, reset it")]
    Timeout { dev: String, offset: u64, ms: u64 },
    /// The page pool had no frame for the metadata reader.
    #[error(
        "{dev}: the page pool has no free frame for metadata reads; give the pool more frames"
    )]
    NoFrame { dev: String },
    /// The namespace's LBAs are larger than a page.
    #[error("{dev}: LBAs of {lba_size} bytes are not supported (at most 4096, a power of two)")]
    LbaSize { dev: String, lba_size: u32 },
    /// No ext superblock.
    #[error("{dev}: no ext2/ext3/ext4 file system: the magic number at byte {} is {found:#06x}, not 0xef53", SUPERBLOCK_OFFSET + MAGIC_AT as u64)]
    NotExt { dev: String, found: u16 },
    /// The journal holds transactions not yet written to their place.
    #[error("{dev}: the file system's journal needs recovery (needs_recovery is set), so its metadata may be stale: run e2fsck on it, or mount and unmount it once under Linux, then try again")]
    NeedsRecovery { dev: String },
    /// Incompatible features this reader does not know.
    #[error("{dev}: the file system uses incompatible features this reader does not support: {}; it cannot be read safely", .features.join(", "))]
    Unsupported { dev: String, features: Vec<String> },
    /// The block size does not fit the cache or the namespace.
    #[error("{dev}: cannot read a file system with {block_size}-byte blocks: {why}")]
    BlockSize {
        dev: String,
        block_size: u64,
        why: String,
    },
    /// Metadata that makes no sense.
    #[error("{dev}: corrupt file system: {what}; check it with e2fsck")]
    Corrupt { dev: String, what: String },
    /// A path component does not exist.
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    /// A path goes through something that is not a directory.
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    /// A symbolic link was expected.
    #[error("inode {ino} is not a symbolic link")]
    NotASymlink { ino: u32 },
    /// Too many symbolic links.
    #[error("{path}: too many levels of symbolic links (more than {MAX_SYMLINKS})")]
    SymlinkLoop { path: String },
    /// The file or directory is encrypted.
    #[error("{what} is encrypted (fscrypt); reading encrypted files is not supported")]
    Encrypted { what: String },
    /// The page cache failed (planning a read).
    #[error(transparent)]
    Cache(#[from] MpageError),
}

/// What the file system and its maps share: the superblock and the metadata reader.
pub(crate) struct FsCore {
    pub(crate) sb: Superblock,
    pub(crate) dev: String,
    meta: Mutex<MetaReader>,
}

impl FsCore {
    pub(crate) fn meta(&self) -> MutexGuard<'_, MetaReader> {
        // The reader's state stays consistent across a panic (a block is cached whole or
        // not at all), so a poisoned lock can be used.
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn corrupt(&self, what: String) -> ExtError {
        ExtError::Corrupt {
            dev: self.dev.clone(),
            what,
        }
    }

    fn read_inode(&self, meta: &mut MetaReader, ino: u32) -> Result<Inode, ExtError> {
        let sb = &self.sb;
        if ino == 0 || ino > sb.inodes_count {
            return Err(self.corrupt(format!(
                "inode number {ino} is out of range (1 to {})",
                sb.inodes_count
            )));
        }
        let bs = sb.block_size as u64;
        let (group, index) = (
            (ino - 1) / sb.inodes_per_group,
            (ino - 1) % sb.inodes_per_group,
        );
        let desc_at = sb.desc_offset(group);
        let desc_block = meta.block(desc_at / bs)?;
        let d = (desc_at % bs) as usize;
        let table = sb.inode_table(&desc_block[d..d + sb.desc_size as usize]);
        let table_blocks = (sb.inodes_per_group as u64 * sb.inode_size as u64).div_ceil(bs);
        if table == 0 || table + table_blocks > sb.blocks_count {
            return Err(self.corrupt(format!(
                "group {group}'s inode table at block {table} lies outside the file system"
            )));
        }
        let at = table * bs + index as u64 * sb.inode_size as u64;
        let block = meta.block(at / bs)?;
        let off = (at % bs) as usize;
        Ok(Inode::parse(ino, &block[off..off + sb.inode_size as usize]))
    }
}

/// The physical layout of a file, found by walking its map.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FileLayout {
    /// "extents", "indirect" or "inline".
    pub scheme: &'static str,
    /// Maximal runs of blocks contiguous both in the file and on disk.
    pub extents: u64,
    /// Blocks with data on disk.
    pub mapped_blocks: u64,
    /// Blocks that read as zeros without I/O (holes, uninitialised extents).
    pub hole_blocks: u64,
    /// The runs: (first file block, first disk block, blocks).
    pub runs: Vec<(u64, u64, u64)>,
}

/// An ext2/ext3/ext4 file system opened read-only (see the module docs).
pub struct ExtFs {
    core: Arc<FsCore>,
}

impl std::fmt::Debug for ExtFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtFs")
            .field("dev", &self.core.dev)
            .field("kind", &self.core.sb.kind())
            .field("block_size", &self.core.sb.block_size)
            .finish()
    }
}

impl ExtFs {
    /// Open the file system on `io`, taking a bounce frame for metadata reads from `pool`.
    /// Checks the superblock: the magic number, the features (a journal needing recovery
    /// and unknown incompatible features are refused), and that a block is a whole number
    /// of the namespace's LBAs and at most a page.
    pub fn open(io: Box<dyn BlockIo + Send>, pool: PagePool) -> Result<ExtFs, ExtError> {
        let dev = io.name().to_string();
        let mut meta = MetaReader::new(io, pool)?;
        let mut raw = vec![0u8; SUPERBLOCK_LEN];
        meta.read_bytes(SUPERBLOCK_OFFSET, &mut raw)?;
        let sb = Superblock::parse(&raw).map_err(|e| match e {
            SuperError::Magic(found) => ExtError::NotExt {
                dev: dev.clone(),
                found,
            },
            SuperError::NeedsRecovery => ExtError::NeedsRecovery { dev: dev.clone() },
            SuperError::Unsupported(features) => ExtError::Unsupported {
                dev: dev.clone(),
                features,
            },
            SuperError::BlockSize(block_size, why) => ExtError::BlockSize {
                dev: dev.clone(),
                block_size,
                why,
            },
            SuperError::Corrupt(what) => ExtError::Corrupt {
                dev: dev.clone(),
                what,
            },
        })?;
        let lba = meta.lba_size();
        if sb.block_size % lba != 0 {
            return Err(ExtError::BlockSize {
                dev,
                block_size: sb.block_size as u64,
                why: format!(
                    "the namespace has {lba}-byte LBAs and a block must be a whole number of \
                     them to be read in place; use a namespace formatted with smaller LBAs, or \
                     make the file system with `mke2fs -b {lba}`"
                ),
            });
        }
        if sb.state & 1 == 0 || sb.state & 2 != 0 {
            log::warn!(
                "{dev}: the file system was not cleanly unmounted or has errors (state {:#x}); reading it anyway",
                sb.state
            );
        }
        meta.set_block_size(sb.block_size);
        log::info!(
            "{dev}: {} file system, {} blocks of {} bytes, {} groups, features {}",
            sb.kind(),
            sb.blocks_count,
            sb.block_size,
            sb.groups,
            sb.feature_names().join(" ")
        );
        Ok(ExtFs {
            core: Arc::new(FsCore {
                sb,
                dev,
                meta: Mutex::new(meta),
            }),
        })
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.core.sb
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.core.sb.block_size
    }

    /// Counters of the metadata reader (this file system and all its maps).
    pub fn meta_stats(&self) -> MetaStats {
        self.core.meta().stats()
    }

    /// Inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode, ExtError> {
        let mut meta = self.core.meta();
        self.core.read_inode(&mut meta, ino)
    }

    /// The root directory.
    pub fn root(&self) -> Result<Inode, ExtError> {
        self.inode(ROOT_INO)
    }

    /// The block map of a file (a regular file, a directory or a slow symlink), to open it
    /// in a [`PageCache`]. Encrypted files are refused.
    pub fn file_map(&self, inode: &Inode) -> Result<ExtFileMap, ExtError> {
        if inode.is_encrypted() {
            return Err(ExtError::Encrypted {
                what: format!("inode {}", inode.ino),
            });
        }
        ExtFileMap::new(Arc::clone(&self.core), inode)
    }

    /// The entries of a directory, `.` and `..` included, in on-disk order.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>, ExtError> {
        let mut out = Vec::new();
        self.scan_dir(dir, &mut |e| {
            out.push(e);
            false
        })?;
        Ok(out)
    }

    /// Hand the entries of a directory to `found` in on-disk order until it returns true.
    /// Blocks after the one holding that entry are not read.
    fn scan_dir(
        &self,
        dir: &Inode,
        found: &mut dyn FnMut(DirEntry) -> bool,
    ) -> Result<(), ExtError> {
        if !dir.is_dir() {
            return Err(ExtError::NotADirectory {
                path: format!("inode {}", dir.ino),
            });
        }
        let filetype = self.core.sb.has_incompat(incompat::FILETYPE);
        let corrupt = |what: String| {
            self.core
                .corrupt(format!("directory inode {}: {what}", dir.ino))
        };
        let map = self.file_map(dir)?;
        let mut entries = Vec::new();
        if map.inline().is_some() {
            // i_block: the parent's inode number, then entries; the rest in system.data.
            let parent =
                u32::from_le_bytes([dir.block[0], dir.block[1], dir.block[2], dir.block[3]]);
            for (name, ino) in [(&b"."[..], dir.ino), (&b".."[..], parent)] {
                entries.push(DirEntry {
                    name: name.to_vec(),
                    ino,
                    file_type: FileType::Directory,
                });
            }
            dir::parse_entries(&dir.block[4..], filetype, &mut entries).map_err(corrupt)?;
            let more = dir.inline_xattr().map_err(corrupt)?;
            dir::parse_entries(&more, filetype, &mut entries).map_err(corrupt)?;
            for e in entries {
                if found(e) {
                    break;
                }
            }
            return Ok(());
        }
        let mut meta = self.core.meta();
        let blocks = map.file_blocks();
        let mut b = 0;
        while b < blocks {
            let m = map.map_with(&mut meta, b, blocks - b)?;
            if let Mapping::Mapped { disk_block, .. } = m {
                for k in 0..m.blocks() {
                    let data = meta.block(disk_block + k)?;
                    dir::parse_entries(&data, filetype, &mut entries)
                        .map_err(|w| corrupt(format!("block {}: {w}", b + k)))?;
                    for e in entries.drain(..) {
                        if found(e) {
                            return Ok(());
                        }
                    }
                }
            }
            b += m.blocks();
        }
        Ok(())
    }

    /// The target of a symbolic link.
    pub fn read_link(&self, link: &Inode) -> Result<Vec<u8>, ExtError> {
        if !link.is_symlink() {
            return Err(ExtError::NotASymlink { ino: link.ino });
        }
        if link.is_encrypted() {
            return Err(ExtError::Encrypted {
                what: format!("symbolic link inode {}", link.ino),
            });
        }
        if link.is_fast_symlink() {
            return Ok(link.block[..link.size as usize].to_vec());
        }
        let bs = self.core.sb.block_size as u64;
        if link.size >= bs {
            return Err(self.core.corrupt(format!(
                "symbolic link inode {} is {} bytes long, more than a block",
                link.ino, link.size
            )));
        }
        let map = self.file_map(link)?;
        if let Some(data) = map.inline() {
            return Ok(data.to_vec());
        }
        let mut meta = self.core.meta();
        match map.map_with(&mut meta, 0, 1)? {
            Mapping::Mapped { disk_block, .. } => {
                Ok(meta.block(disk_block)?[..link.size as usize].to_vec())
            }
            Mapping::Hole { .. } => Err(self.core.corrupt(format!(
                "symbolic link inode {} has no data block",
                link.ino
            ))),
        }
    }

    /// The inode a path names, following symbolic links (the last component's too).
    /// Paths are taken from the root whether or not they start with `/`.
    pub fn lookup(&self, path: &str) -> Result<Inode, ExtError> {
        self.resolve(path, true)
    }

    /// Like [`ExtFs::lookup`], but a symbolic link as the last component is not followed.
    pub fn lookup_nofollow(&self, path: &str) -> Result<Inode, ExtError> {
        self.resolve(path, false)
    }

    fn find_entry(&self, dir: &Inode, name: &[u8]) -> Result<Option<u32>, ExtError> {
        let mut ino = None;
        self.scan_dir(dir, &mut |e| {
            if e.name == name {
                ino = Some(e.ino);
            }
            ino.is_some()
        })?;
        Ok(ino)
    }

    fn resolve(&self, path: &str, follow_last: bool) -> Result<Inode, ExtError> {
        let split = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&c| c == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut todo: VecDeque<Vec<u8>> = split(path.as_bytes()).into();
        let mut cur = self.root()?;
        // The path as walked so far, for messages.
        let mut walked = String::new();
        let mut links = 0u32;
        while let Some(name) = todo.pop_front() {
            let shown = format!("{walked}/{}", String::from_utf8_lossy(&name));
            if !cur.is_dir() {
                return Err(ExtError::NotADirectory {
                    path: if walked.is_empty() {
                        "/".into()
                    } else {
                        walked
                    },
                });
            }
            if cur.is_encrypted() {
                return Err(ExtError::Encrypted {
                    what: format!(
                        "directory {}",
                        if walked.is_empty() { "/" } else { &walked }
                    ),
                });
            }
            let ino = self
                .find_entry(&cur, &name)?
                .ok_or_else(|| ExtError::NotFound {
                    path: shown.clone(),
                })?;
            let next = self.inode(ino)?;
            if next.is_symlink() && (follow_last || !todo.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ExtError::SymlinkLoop {
                        path: path.to_string(),
                    });
                }
                let target = self.read_link(&next)?;
                log::debug!(
                    "{}: {shown} -> {}",
                    self.core.dev,
                    String::from_utf8_lossy(&target)
                );
                if target.first() == Some(&b'/') {
                    cur = self.root()?;
                    walked.clear();
                }
                for c in split(&target).into_iter().rev() {
                    todo.push_front(c);
                }
                continue;
            }
            cur = next;
            walked = shown;
        }
        Ok(cur)
    }

    /// Walk a file's map from its first block to its end: its runs and holes.
    pub fn layout(&self, inode: &Inode) -> Result<FileLayout, ExtError> {
        let map = self.file_map(inode)?;
        let mut l = FileLayout {
            scheme: map.scheme_name(),
            ..FileLayout::default()
        };
        if map.inline().is_some() {
            return Ok(l);
        }
        let mut meta = self.core.meta();
        let blocks = map.file_blocks();
        let mut b = 0;
        while b < blocks {
            let m = map.map_with(&mut meta, b, blocks - b)?;
            match m {
                Mapping::Mapped {
                    disk_block,
                    blocks: n,
                    ..
                } => {
                    l.mapped_blocks += n;
                    match l.runs.last_mut() {
                        Some((f, d, len)) if *f + *len == b && *d + *len == disk_block => *len += n,
                        _ => l.runs.push((b, disk_block, n)),
                    }
                }
                Mapping::Hole { blocks: n } => l.hole_blocks += n.min(blocks - b),
            }
            b += m.blocks();
        }
        l.extents = l.runs.len() as u64;
        Ok(l)
    }

    /// The commands a full read of the file through a page cache with `opts` would issue
    /// on this device, found by running the cache over a [`PlanDevice`] with the device's
    /// LBA size and max transfer. Frames come from `pool` and are given back. The map's
    /// metadata reads are real (they show in [`ExtFs::meta_stats`]). To match a read that
    /// starts with cold metadata, plan before anything else reads the file's index or
    /// indirect blocks: a cached one sets no `boundary`, so a command may run on past it.
    pub fn plan_read(
        &self,
        inode: &Inode,
        pool: &PagePool,
        opts: CacheOptions,
    ) -> Result<CacheStats, ExtError> {
        let map = self.file_map(inode)?;
        let dev = {
            let meta = self.core.meta();
            PlanDevice::new(&self.core.dev, meta.lba_size(), meta.max_transfer())
        };
        let mut cache = PageCache::new(dev, pool.clone(), opts)?;
        let f = cache.open(Box::new(map), inode.size)?;
        copy_file(&mut cache, f, &mut std::io::sink()).map_err(|e| match e {
            CopyError::Read(e) => ExtError::Cache(e),
            other => self.core.corrupt(other.to_string()),
        })?;
        let stats = cache.stats();
        cache.close(f)?;
        Ok(stats)
    }
}
