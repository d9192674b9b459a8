//! [`ExtFileMap`]: the block map of one inode, for the page cache.
//!
//! Three schemes, chosen by the inode's flags:
//! - **extent tree** (`EXT4_EXTENTS_FL`): a root of up to four entries in `i_block`, index
//!   nodes and leaves in blocks of their own, read when a lookup first needs them and kept in
//!   the metadata reader's block cache. Uninitialised extents read as holes (zeros).
//! - **indirect blocks** (ext2/ext3): 12 direct pointers, then single, double and triple
//!   indirect blocks. The last block a pointer block maps is a `boundary` when the next
//!   block's pointer block is not cached yet: the cache then sends the data it has gathered
//!   before the map reads that pointer block (the `BH_Boundary` case of `fs/mpage.c`).
//!   Extent leaves get the same flag on their last extent when the next leaf is not cached.
//! - **inline data** (`EXT4_INLINE_DATA_FL`): block 0 is `uptodate`, served by
//!   [`BlockMap::read_inline`] from `i_block` and the `system.data` attribute.
//!
//! The map is read-only: `create` and `truncate` are refused, nothing is ever written.

use std::sync::Arc;

use super::inode::{Inode, I_BLOCK_LEN};
use super::io::MetaReader;
use super::le::{u16_at, u32_at};
use super::{ExtError, FsCore};
use crate::map::{BlockMap, MapError, MapFlags, Mapping};

/// `eh_magic` of extent tree nodes.
const EXTENT_MAGIC: u16 = 0xF30A;
/// Bytes of a node header and of each entry.
const ENTRY: usize = 12;
/// Deepest extent tree Linux builds (a depth of 5 covers 2^32 blocks many times over).
const MAX_DEPTH: u16 = 5;
/// `ee_len` above this marks an uninitialised extent.
const INIT_MAX_LEN: u16 = 32768;
/// Direct pointers in `i_block`.
const DIRECT: u64 = 12;

/// How many of `n` entries, sorted by `key`, have a key at or before `b`.
fn count_at_or_before(n: usize, key: impl Fn(usize) -> u64, b: u64) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if key(mid) <= b {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// How the inode's blocks are found.
#[derive(Clone, Debug)]
enum Scheme {
    Extents([u8; I_BLOCK_LEN]),
    Indirect([u32; 15]),
    Inline(Arc<[u8]>),
}

/// The block map of one inode (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct ExtFileMap {
    core: Arc<FsCore>,
    ino: u32,
    size: u64,
    scheme: Scheme,
}

impl std::fmt::Debug for ExtFileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtFileMap")
            .field("ino", &self.ino)
            .field("size", &self.size)
            .field("scheme", &self.scheme_name())
            .finish()
    }
}

/// Where the subtree after the one a lookup descends into starts: its first file block and
/// the node that must be read to map it (from the deepest index level that has one).
#[derive(Copy, Clone, Debug, Default)]
struct NextSubtree {
    start: Option<u64>,
    node: Option<u64>,
}

/// Byte offset of entry `i` of an extent tree node (after the 12-byte header).
fn entry_at(i: usize) -> usize {
    ENTRY * (1 + i)
}

/// The child block an index entry points to (`ei_leaf_lo`, `ei_leaf_hi`).
fn index_child(node: &[u8], i: usize) -> u64 {
    let e = entry_at(i);
    u32_at(node, e + 4) as u64 | (u16_at(node, e + 8) as u64) << 32
}

/// An extent tree node's header.
struct Header {
    entries: usize,
    depth: u16,
}

impl ExtFileMap {
    pub(crate) fn new(core: Arc<FsCore>, inode: &Inode) -> Result<ExtFileMap, ExtError> {
        let scheme = if inode.is_inline() {
            let data = inode
                .inline_data()
                .map_err(|w| core.corrupt(format!("inode {}: {w}", inode.ino)))?;
            Scheme::Inline(data.into())
        } else if inode.has_flag(super::inode::flags::EXTENTS) {
            Scheme::Extents(inode.block)
        } else {
            Scheme::Indirect(inode.block_words())
        };
        Ok(ExtFileMap {
            core,
            ino: inode.ino,
            size: inode.size,
            scheme,
        })
    }

    /// The inode mapped.
    pub fn ino(&self) -> u32 {
        self.ino
    }

    /// The file size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// "extents", "indirect" or "inline".
    pub fn scheme_name(&self) -> &'static str {
        match self.scheme {
            Scheme::Extents(_) => "extents",
            Scheme::Indirect(_) => "indirect",
            Scheme::Inline(_) => "inline",
        }
    }

    /// Blocks up to the end of the file.
    pub fn file_blocks(&self) -> u64 {
        self.size.div_ceil(self.core.sb.block_size as u64)
    }

    /// Map with the metadata reader locked by the caller.
    pub(crate) fn map_with(
        &self,
        meta: &mut MetaReader,
        b: u64,
        max: u64,
    ) -> Result<Mapping, ExtError> {
        let max = max.max(1);
        match &self.scheme {
            Scheme::Extents(root) => self.map_extents(meta, root, b, max),
            Scheme::Indirect(words) => self.map_indirect(meta, words, b, max),
            Scheme::Inline(data) => Ok(if b == 0 && !data.is_empty() {
                Mapping::Mapped {
                    disk_block: 0,
                    blocks: 1,
                    flags: MapFlags {
                        uptodate: true,
                        ..MapFlags::default()
                    },
                }
            } else {
                Mapping::Hole {
                    blocks: if b == 0 { 1 } else { max },
                }
            }),
        }
    }

    /// The inline data, for an inline file.
    pub(crate) fn inline(&self) -> Option<&[u8]> {
        match &self.scheme {
            Scheme::Inline(d) => Some(d),
            _ => None,
        }
    }

    fn corrupt(&self, what: String) -> ExtError {
        self.core.corrupt(format!("inode {}: {what}", self.ino))
    }

    fn check_disk(&self, disk: u64, blocks: u64) -> Result<(), ExtError> {
        let total = self.core.sb.blocks_count;
        if disk.checked_add(blocks).is_none_or(|end| end > total) || disk == 0 {
            return Err(self.corrupt(format!(
                "blocks {disk}..{} lie outside the file system's {total} blocks",
                disk.saturating_add(blocks)
            )));
        }
        Ok(())
    }

    // ---- extent trees ------------------------------------------------------------------

    fn header(&self, node: &[u8], where_: &str) -> Result<Header, ExtError> {
        let magic = u16_at(node, 0);
        if magic != EXTENT_MAGIC {
            return Err(self.corrupt(format!(
                "extent node {where_} has magic {magic:#06x}, not {EXTENT_MAGIC:#06x}"
            )));
        }
        let entries = u16_at(node, 2) as usize;
        let max = u16_at(node, 4) as usize;
        let depth = u16_at(node, 6);
        if entries > max || ENTRY * (1 + max) > node.len() || depth > MAX_DEPTH {
            return Err(self.corrupt(format!(
                "extent node {where_}: {entries} of {max} entries, depth {depth}"
            )));
        }
        Ok(Header { entries, depth })
    }

    fn map_extents(
        &self,
        meta: &mut MetaReader,
        root: &[u8; I_BLOCK_LEN],
        b: u64,
        max: u64,
    ) -> Result<Mapping, ExtError> {
        if b > u32::MAX as u64 {
            return Ok(Mapping::Hole { blocks: max });
        }
        let mut node: Arc<[u8]> = Arc::from(&root[..]);
        let mut where_ = "in the inode".to_string();
        let mut next = NextSubtree::default();
        let mut want_depth: Option<u16> = None;
        loop {
            let h = self.header(&node, &where_)?;
            if let Some(want) = want_depth.filter(|&d| d != h.depth) {
                return Err(self.corrupt(format!(
                    "extent node {where_} has depth {}, its parent says {want}",
                    h.depth
                )));
            }
            if h.depth == 0 {
                return self.leaf(meta, &node, h.entries, b, max, next);
            }
            if h.entries == 0 {
                return Err(self.corrupt(format!("extent index node {where_} is empty")));
            }
            // The last index entry starting at or before b (the first if none does: the
            // blocks before it are a hole its leaf will report).
            let i = count_at_or_before(h.entries, |i| u32_at(&node, entry_at(i)) as u64, b)
                .saturating_sub(1);
            if i + 1 < h.entries {
                next = NextSubtree {
                    start: Some(u32_at(&node, entry_at(i + 1)) as u64),
                    node: Some(index_child(&node, i + 1)),
                };
            }
            let child = index_child(&node, i);
            self.check_disk(child, 1)?;
            node = meta.block(child)?;
            where_ = format!("at block {child}");
            want_depth = Some(h.depth - 1);
        }
    }

    /// Map `b` in the leaf `node` of `entries` extents.
    fn leaf(
        &self,
        meta: &MetaReader,
        node: &[u8],
        entries: usize,
        b: u64,
        max: u64,
        next: NextSubtree,
    ) -> Result<Mapping, ExtError> {
        let extent = |i: usize| {
            let e = entry_at(i);
            let start = u32_at(node, e) as u64;
            let raw_len = u16_at(node, e + 4);
            let (len, uninit) = if raw_len > INIT_MAX_LEN {
                (raw_len - INIT_MAX_LEN, true)
            } else {
                (raw_len, false)
            };
            let disk = u32_at(node, e + 8) as u64 | (u16_at(node, e + 6) as u64) << 32;
            (start, len as u64, disk, uninit)
        };
        let at_or_before = count_at_or_before(entries, |i| extent(i).0, b);
        if at_or_before > 0 {
            let i = at_or_before - 1;
            let (start, len, disk, uninit) = extent(i);
            if len == 0 {
                return Err(self.corrupt(format!("extent at file block {start} has no blocks")));
            }
            if b < start + len {
                let left = start + len - b;
                let blocks = left.min(max);
                if uninit {
                    return Ok(Mapping::Hole { blocks });
                }
                self.check_disk(disk, len)?;
                // The leaf's last extent, when the next leaf must be read: a boundary.
                let boundary = blocks == left
                    && i + 1 == entries
                    && next.node.is_some_and(|n| !meta.is_cached(n));
                return Ok(Mapping::Mapped {
                    disk_block: disk + (b - start),
                    blocks,
                    flags: MapFlags {
                        boundary,
                        ..MapFlags::default()
                    },
                });
            }
        }
        let hole_end = if at_or_before < entries {
            extent(at_or_before).0
        } else {
            next.start.unwrap_or(u64::MAX)
        };
        if hole_end <= b {
            return Err(self.corrupt(format!("extents out of order around file block {b}")));
        }
        Ok(Mapping::Hole {
            blocks: (hole_end - b).min(max),
        })
    }

    // ---- indirect blocks ---------------------------------------------------------------

    /// Pointers per indirect block.
    fn apb(&self) -> u64 {
        self.core.sb.block_size as u64 / 4
    }

    /// The path to file block `b`: the depth (0 direct, 1 to 3 indirect) and the index at
    /// each level, starting with the index into `i_block`. None beyond triple indirect.
    fn path(&self, b: u64) -> Option<(usize, [u64; 4])> {
        let apb = self.apb();
        if b < DIRECT {
            return Some((0, [b, 0, 0, 0]));
        }
        let b = b - DIRECT;
        if b < apb {
            return Some((1, [12, b, 0, 0]));
        }
        let b = b - apb;
        if b < apb * apb {
            return Some((2, [13, b / apb, b % apb, 0]));
        }
        let b = b - apb * apb;
        if b < apb * apb * apb {
            return Some((3, [14, b / (apb * apb), (b / apb) % apb, b % apb]));
        }
        None
    }

    fn map_indirect(
        &self,
        meta: &mut MetaReader,
        words: &[u32; 15],
        b: u64,
        max: u64,
    ) -> Result<Mapping, ExtError> {
        let Some((depth, off)) = self.path(b) else {
            return Ok(Mapping::Hole { blocks: max });
        };
        let apb = self.apb();
        if depth == 0 {
            let ptrs: Vec<u32> = words[..DIRECT as usize].to_vec();
            return self.run(meta, words, &ptrs, off[0] as usize, b, max);
        }
        let mut ptr = words[off[0] as usize] as u64;
        for k in 1..=depth {
            if ptr == 0 {
                // Nothing under this pointer: a hole to the end of its subtree.
                let span = apb.pow((depth - k + 1) as u32);
                let pos = (k..=depth).fold(0, |acc, j| acc * apb + off[j]);
                return Ok(Mapping::Hole {
                    blocks: (span - pos).min(max),
                });
            }
            self.check_disk(ptr, 1)?;
            let data = meta.block(ptr)?;
            if k == depth {
                let ptrs: Vec<u32> = (0..apb as usize).map(|i| u32_at(&data, i * 4)).collect();
                return self.run(meta, words, &ptrs, off[k] as usize, b, max);
            }
            ptr = u32_at(&data, off[k] as usize * 4) as u64;
        }
        unreachable!("the loop returns at the last level")
    }

    /// The run starting at `ptrs[idx]` (file block `b`) inside one pointer array.
    fn run(
        &self,
        meta: &MetaReader,
        words: &[u32; 15],
        ptrs: &[u32],
        idx: usize,
        b: u64,
        max: u64,
    ) -> Result<Mapping, ExtError> {
        let room = ((ptrs.len() - idx) as u64).min(max) as usize;
        let first = ptrs[idx];
        if first == 0 {
            let n = ptrs[idx..idx + room]
                .iter()
                .take_while(|&&p| p == 0)
                .count();
            return Ok(Mapping::Hole { blocks: n as u64 });
        }
        let n = (0..room)
            .take_while(|&k| ptrs[idx + k] as u64 == first as u64 + k as u64)
            .count();
        self.check_disk(first as u64, n as u64)?;
        let boundary = idx + n == ptrs.len() && !self.path_cached(meta, words, b + n as u64);
        Ok(Mapping::Mapped {
            disk_block: first as u64,
            blocks: n as u64,
            flags: MapFlags {
                boundary,
                ..MapFlags::default()
            },
        })
    }

    /// Whether mapping file block `b` needs no pointer block that is not cached.
    fn path_cached(&self, meta: &MetaReader, words: &[u32; 15], b: u64) -> bool {
        let Some((depth, off)) = self.path(b) else {
            return true;
        };
        let mut ptr = words[off[0] as usize] as u64;
        // The pointer blocks on the way down, deepest last; the last one's entry is the
        // data block itself, not needed here.
        for &index in &off[1..=depth] {
            if ptr == 0 {
                return true;
            }
            let Some(data) = meta.peek(ptr) else {
                return false;
            };
            ptr = u32_at(&data, index as usize * 4) as u64;
        }
        true
    }
}

impl BlockMap for ExtFileMap {
    fn block_size(&self) -> u32 {
        self.core.sb.block_size
    }

    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        if create {
            return Err(MapError::Failed {
                file_block,
                reason: format!(
                    "{}: the ext file system is open read-only; nothing is allocated or written",
                    self.core.dev
                ),
            });
        }
        let mut meta = self.core.meta();
        self.map_with(&mut meta, file_block, max_blocks)
            .map_err(|e| MapError::Failed {
                file_block,
                reason: e.to_string(),
            })
    }

    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        match &self.scheme {
            Scheme::Inline(data) if file_block == 0 => {
                let n = data.len().min(dst.len());
                dst[..n].copy_from_slice(&data[..n]);
                dst[n..].fill(0);
                Ok(())
            }
            _ => Err(MapError::NoInlineData { file_block }),
        }
    }

    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        Err(MapError::Failed {
            file_block: first_block,
            reason: format!(
                "{}: the ext file system is open read-only; files cannot change size",
                self.core.dev
            ),
        })
    }
}
