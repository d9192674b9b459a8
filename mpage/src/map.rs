//! Block maps: where a file's blocks live on the namespace (the `get_block` role).
//!
//! File blocks and disk blocks are both in units of the file's block size; the cache turns
//! disk blocks into LBAs. A map answers for a run of blocks at once, so one call can cover a
//! whole readahead window.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// Flags of a mapped run.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFlags {
    /// The run's last block is a boundary: mapping the block after it needs I/O of its own
    /// (an indirect block, say), so submit what has been built before asking.
    pub boundary: bool,
    /// The blocks were allocated by this call (`create`).
    pub new: bool,
    /// The map holds the data itself (inline data): read it with
    /// [`BlockMap::read_inline`], not from the disk.
    pub uptodate: bool,
}

/// The answer for a run of file blocks starting at the block asked for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `blocks` file blocks lie at `disk_block..disk_block + blocks`.
    Mapped {
        disk_block: u64,
        blocks: u64,
        flags: MapFlags,
    },
    /// `blocks` file blocks have no disk block: they read as zeros.
    Hole { blocks: u64 },
}

impl Mapping {
    /// Length of the run in blocks.
    pub fn blocks(&self) -> u64 {
        match *self {
            Mapping::Mapped { blocks, .. } | Mapping::Hole { blocks } => blocks,
        }
    }
}

/// Why a block could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The storage engine could not map the block.
    #[error("mapping file block {file_block} failed: {reason}")]
    Failed { file_block: u64, reason: String },
    /// Allocation for a write found no free disk block.
    #[error(
        "no disk block left to allocate file block {file_block} (allocation range {range:?} is \
         used up, or the map allocates nothing); give the map a larger allocation range"
    )]
    NoSpace {
        file_block: u64,
        range: Option<Range<u64>>,
    },
    /// The block lies outside what the map covers.
    #[error("file block {file_block} is beyond the {blocks} block(s) this map covers")]
    OutOfRange { file_block: u64, blocks: u64 },
    /// The map flagged the block uptodate but supplies no data for it.
    #[error("file block {file_block} is flagged uptodate but the map has no data for it")]
    NoInlineData { file_block: u64 },
}

/// The storage engine's view of a file: where its blocks are.
///
/// Contract of [`BlockMap::map`]: the answer covers at least one and at most `max_blocks`
/// blocks (`max_blocks` ≥ 1) starting at `file_block`. With `create`, a hole is allocated
/// (implementations may allocate fewer blocks than asked, one at least); without it, a hole
/// is reported as such. A `boundary` flag applies to the run's last block.
pub trait BlockMap: Send {
    /// The file's block size in bytes (a power of two, 512 to 4096).
    fn block_size(&self) -> u32;

    /// Map the run of blocks starting at `file_block`.
    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError>;

    /// The data of a block whose mapping was flagged `uptodate`; `dst` is one block long.
    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        let _ = dst;
        Err(MapError::NoInlineData { file_block })
    }

    /// The file now ends before `first_block`: blocks from there on hold no file data and
    /// must read as holes until they are mapped again with `create`.
    fn truncate(&mut self, first_block: u64) -> Result<(), MapError>;
}

impl<M: BlockMap + ?Sized> BlockMap for Box<M> {
    fn block_size(&self) -> u32 {
        (**self).block_size()
    }
    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        (**self).map(file_block, max_blocks, create)
    }
    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        (**self).read_inline(file_block, dst)
    }
    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        (**self).truncate(first_block)
    }
}

/// A file that is a range of the namespace: file block `b` is disk block `first + b`.
///
/// After [`BlockMap::truncate`] the blocks beyond the new end read as holes until written
/// (mapped with `create`) again, so a file that shrank and grew shows zeros, not stale data.
#[derive(Clone, Debug)]
pub struct Linear {
    block_size: u32,
    first_disk_block: u64,
    blocks: u64,
    /// Blocks from here on were released by a truncate...
    released_from: u64,
    /// ...except these, mapped again since.
    remapped: BTreeSet<u64>,
}

impl Linear {
    /// `blocks` blocks of `block_size` bytes starting at disk block `first_disk_block`.
    pub fn new(block_size: u32, first_disk_block: u64, blocks: u64) -> Linear {
        Linear {
            block_size,
            first_disk_block,
            blocks,
            released_from: blocks,
            remapped: BTreeSet::new(),
        }
    }
}

impl BlockMap for Linear {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        if file_block >= self.blocks {
            return Err(MapError::OutOfRange {
                file_block,
                blocks: self.blocks,
            });
        }
        let max = max_blocks.max(1).min(self.blocks - file_block);
        let disk_block = self.first_disk_block + file_block;
        if file_block < self.released_from {
            let blocks = max.min(self.released_from - file_block);
            return Ok(Mapping::Mapped {
                disk_block,
                blocks,
                flags: MapFlags::default(),
            });
        }
        if self.remapped.contains(&file_block) {
            return Ok(Mapping::Mapped {
                disk_block,
                blocks: 1,
                flags: MapFlags::default(),
            });
        }
        if create {
            self.remapped.insert(file_block);
            return Ok(Mapping::Mapped {
                disk_block,
                blocks: 1,
                flags: MapFlags {
                    new: true,
                    ..MapFlags::default()
                },
            });
        }
        let next = self
            .remapped
            .range(file_block..)
            .next()
            .copied()
            .unwrap_or(self.blocks);
        Ok(Mapping::Hole {
            blocks: max.min(next - file_block),
        })
    }

    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        self.released_from = self.released_from.min(first_block);
        self.remapped.retain(|&b| b < first_block);
        Ok(())
    }
}

/// One extent of an [`ExtentMap`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// First file block.
    pub file_block: u64,
    /// Where it lies on disk (in block-size units).
    pub disk_block: u64,
    /// Length in blocks (at least 1).
    pub blocks: u64,
    /// The extent's last block is a boundary.
    pub boundary: bool,
    /// The map holds the extent's data itself.
    pub uptodate: bool,
}

impl Extent {
    /// A plain extent.
    pub fn new(file_block: u64, disk_block: u64, blocks: u64) -> Extent {
        Extent {
            file_block,
            disk_block,
            blocks,
            boundary: false,
            uptodate: false,
        }
    }

    fn file_end(&self) -> u64 {
        self.file_block + self.blocks
    }

    fn disk_end(&self) -> u64 {
        self.disk_block + self.blocks
    }
}

/// Why an extent cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    /// An extent of no blocks.
    #[error("an extent needs at least one block (file block {file_block})")]
    Empty { file_block: u64 },
    /// Block numbers overflow.
    #[error(
        "extent at file block {file_block} of {blocks} blocks runs past the largest block number"
    )]
    Overflow { file_block: u64, blocks: u64 },
    /// Two extents claim the same file blocks.
    #[error("extent at file blocks {new:?} overlaps the extent at file blocks {old:?}")]
    FileOverlap { new: Range<u64>, old: Range<u64> },
    /// Two extents claim the same disk blocks.
    #[error("extent at disk blocks {new:?} overlaps the extent at disk blocks {old:?}")]
    DiskOverlap { new: Range<u64>, old: Range<u64> },
}

/// Extents with holes and flags, allocating one block per `create` call, ascending, from an
/// allocation range (skipping disk blocks that extents use). Blocks can be made to fail.
#[derive(Clone, Debug)]
pub struct ExtentMap {
    block_size: u32,
    /// By first file block.
    extents: BTreeMap<u64, Extent>,
    /// Disk start → length, to keep allocations clear of existing extents.
    disk: BTreeMap<u64, u64>,
    errors: BTreeSet<u64>,
    alloc: Option<Range<u64>>,
    next_alloc: u64,
    inline: BTreeMap<u64, Vec<u8>>,
}

impl ExtentMap {
    /// An empty map (every block a hole) that allocates nothing.
    pub fn new(block_size: u32) -> ExtentMap {
        ExtentMap {
            block_size,
            extents: BTreeMap::new(),
            disk: BTreeMap::new(),
            errors: BTreeSet::new(),
            alloc: None,
            next_alloc: 0,
            inline: BTreeMap::new(),
        }
    }

    /// A map of the given extents.
    pub fn with_extents(
        block_size: u32,
        extents: impl IntoIterator<Item = Extent>,
    ) -> Result<ExtentMap, ExtentError> {
        let mut m = ExtentMap::new(block_size);
        for e in extents {
            m.add_extent(e)?;
        }
        Ok(m)
    }

    /// Add an extent; it may not overlap another in the file or on disk.
    pub fn add_extent(&mut self, e: Extent) -> Result<(), ExtentError> {
        if e.blocks == 0 {
            return Err(ExtentError::Empty {
                file_block: e.file_block,
            });
        }
        if e.file_block.checked_add(e.blocks).is_none()
            || e.disk_block.checked_add(e.blocks).is_none()
        {
            return Err(ExtentError::Overflow {
                file_block: e.file_block,
                blocks: e.blocks,
            });
        }
        if let Some(old) = self.file_overlap(e.file_block..e.file_end()) {
            return Err(ExtentError::FileOverlap {
                new: e.file_block..e.file_end(),
                old,
            });
        }
        if let Some(old) = self.disk_overlap(e.disk_block..e.disk_end()) {
            return Err(ExtentError::DiskOverlap {
                new: e.disk_block..e.disk_end(),
                old,
            });
        }
        self.disk.insert(e.disk_block, e.blocks);
        self.extents.insert(e.file_block, e);
        Ok(())
    }

    fn file_overlap(&self, r: Range<u64>) -> Option<Range<u64>> {
        self.extents
            .range(..r.end)
            .next_back()
            .filter(|(_, e)| e.file_end() > r.start)
            .map(|(_, e)| e.file_block..e.file_end())
    }

    fn disk_overlap(&self, r: Range<u64>) -> Option<Range<u64>> {
        self.disk
            .range(..r.end)
            .next_back()
            .filter(|(&s, &n)| s + n > r.start)
            .map(|(&s, &n)| s..s + n)
    }

    /// Allocate from `range` of disk blocks, lowest first.
    pub fn set_allocation_range(&mut self, range: Range<u64>) {
        self.next_alloc = range.start;
        self.alloc = Some(range);
    }

    /// Make the mapping of `file_block` fail.
    pub fn fail_block(&mut self, file_block: u64) {
        self.errors.insert(file_block);
    }

    /// Let the mapping of `file_block` succeed again.
    pub fn heal_block(&mut self, file_block: u64) {
        self.errors.remove(&file_block);
    }

    /// The data of a block in an `uptodate` extent (one block long; shorter data is padded with
    /// zeros). Blocks of such extents without data read as zeros.
    pub fn set_inline(&mut self, file_block: u64, data: Vec<u8>) {
        self.inline.insert(file_block, data);
    }

    /// The extents, by file block.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.extents.values()
    }

    /// The disk block of `file_block`, if mapped.
    pub fn lookup(&self, file_block: u64) -> Option<u64> {
        self.extent_at(file_block)
            .map(|e| e.disk_block + (file_block - e.file_block))
    }

    fn extent_at(&self, b: u64) -> Option<&Extent> {
        self.extents
            .range(..=b)
            .next_back()
            .map(|(_, e)| e)
            .filter(|e| e.file_end() > b)
    }

    /// Split the extent containing `b` (if any) so that an extent starts at `b`.
    fn split_at(&mut self, b: u64) {
        let Some(e) = self.extent_at(b).cloned() else {
            return;
        };
        if e.file_block == b {
            return;
        }
        let head = b - e.file_block;
        let tail = Extent {
            file_block: b,
            disk_block: e.disk_block + head,
            blocks: e.blocks - head,
            boundary: e.boundary,
            uptodate: e.uptodate,
        };
        let first = self
            .extents
            .get_mut(&e.file_block)
            .expect("extent found above");
        first.blocks = head;
        first.boundary = false;
        self.disk.insert(e.disk_block, head);
        self.disk.insert(tail.disk_block, tail.blocks);
        self.extents.insert(b, tail);
    }

    fn remove_extent(&mut self, file_block: u64) -> Option<Extent> {
        let e = self.extents.remove(&file_block)?;
        self.disk.remove(&e.disk_block);
        Some(e)
    }

    /// The lowest free disk block at or after the allocation cursor.
    fn allocate(&mut self, file_block: u64) -> Result<u64, MapError> {
        let Some(range) = self.alloc.clone() else {
            return Err(MapError::NoSpace {
                file_block,
                range: None,
            });
        };
        let mut d = self.next_alloc.max(range.start);
        while let Some(used) = self.disk_overlap(d..d + 1) {
            d = used.end;
        }
        if d >= range.end {
            return Err(MapError::NoSpace {
                file_block,
                range: Some(range),
            });
        }
        self.next_alloc = d + 1;
        Ok(d)
    }

    /// Insert a one-block extent, merged with plain neighbours it continues.
    fn insert_block(&mut self, b: u64, d: u64) {
        let mut e = Extent::new(b, d, 1);
        if let Some(prev) = self.extent_at(b.wrapping_sub(1)).cloned() {
            if b > 0
                && prev.file_end() == b
                && prev.disk_end() == d
                && !prev.boundary
                && !prev.uptodate
            {
                self.remove_extent(prev.file_block);
                e = Extent::new(prev.file_block, prev.disk_block, prev.blocks + 1);
            }
        }
        if let Some(next) = self.extents.get(&(b + 1)).cloned() {
            if next.disk_block == d + 1 && !next.uptodate {
                self.remove_extent(next.file_block);
                e.blocks += next.blocks;
                e.boundary = next.boundary;
            }
        }
        self.disk.insert(e.disk_block, e.blocks);
        self.extents.insert(e.file_block, e);
    }

    fn next_error(&self, b: u64) -> Option<u64> {
        self.errors.range(b..).next().copied()
    }
}

impl BlockMap for ExtentMap {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn map(&mut self, file_block: u64, max_blocks: u64, create: bool) -> Result<Mapping, MapError> {
        let b = file_block;
        if self.errors.contains(&b) {
            return Err(MapError::Failed {
                file_block: b,
                reason: "the map reports an error for this block".into(),
            });
        }
        // Runs stop short of the next failing block.
        let limit = max_blocks
            .max(1)
            .min(self.next_error(b).map_or(u64::MAX, |e| e - b));
        if let Some(e) = self.extent_at(b).cloned() {
            if create && e.uptodate {
                // Writing converts inline data into a plain block of the extent.
                self.split_at(b);
                self.split_at(b + 1);
                let one = self.extents.get_mut(&b).expect("split made an extent at b");
                one.uptodate = false;
                let disk_block = one.disk_block;
                return Ok(Mapping::Mapped {
                    disk_block,
                    blocks: 1,
                    flags: MapFlags {
                        boundary: one.boundary,
                        ..MapFlags::default()
                    },
                });
            }
            let left = e.file_end() - b;
            let blocks = left.min(limit);
            let flags = MapFlags {
                boundary: e.boundary && blocks == left,
                new: false,
                uptodate: e.uptodate,
            };
            return Ok(Mapping::Mapped {
                disk_block: e.disk_block + (b - e.file_block),
                blocks,
                flags,
            });
        }
        if create {
            let d = self.allocate(b)?;
            self.insert_block(b, d);
            return Ok(Mapping::Mapped {
                disk_block: d,
                blocks: 1,
                flags: MapFlags {
                    new: true,
                    ..MapFlags::default()
                },
            });
        }
        let next_extent = self.extents.range(b..).next().map_or(u64::MAX, |(&s, _)| s);
        Ok(Mapping::Hole {
            blocks: limit.min(next_extent - b),
        })
    }

    fn read_inline(&mut self, file_block: u64, dst: &mut [u8]) -> Result<(), MapError> {
        match self.extent_at(file_block) {
            Some(e) if e.uptodate => {
                dst.fill(0);
                if let Some(data) = self.inline.get(&file_block) {
                    let n = data.len().min(dst.len());
                    dst[..n].copy_from_slice(&data[..n]);
                }
                Ok(())
            }
            _ => Err(MapError::NoInlineData { file_block }),
        }
    }

    fn truncate(&mut self, first_block: u64) -> Result<(), MapError> {
        self.split_at(first_block);
        let gone: Vec<u64> = self.extents.range(first_block..).map(|(&s, _)| s).collect();
        for s in gone {
            self.remove_extent(s);
        }
        self.inline.retain(|&b, _| b < first_block);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(disk_block: u64, blocks: u64) -> Mapping {
        Mapping::Mapped {
            disk_block,
            blocks,
            flags: MapFlags::default(),
        }
    }

    #[test]
    fn extent_runs_stop_at_extent_ends_errors_and_max() {
        let mut m =
            ExtentMap::with_extents(4096, [Extent::new(0, 100, 4), Extent::new(6, 200, 10)])
                .unwrap();
        m.fail_block(9);
        assert_eq!(m.map(0, 16, false).unwrap(), mapped(100, 4));
        assert_eq!(m.map(1, 2, false).unwrap(), mapped(101, 2));
        assert_eq!(m.map(4, 16, false).unwrap(), Mapping::Hole { blocks: 2 });
        assert_eq!(
            m.map(6, 16, false).unwrap(),
            mapped(200, 3),
            "stops before failing block 9"
        );
        assert!(matches!(
            m.map(9, 1, false),
            Err(MapError::Failed { file_block: 9, .. })
        ));
        assert_eq!(m.map(16, 5, false).unwrap(), Mapping::Hole { blocks: 5 });
    }

    #[test]
    fn boundary_only_when_the_run_reaches_the_extent_end() {
        let mut e = Extent::new(0, 1000, 12);
        e.boundary = true;
        let mut m = ExtentMap::with_extents(4096, [e, Extent::new(12, 1012, 4)]).unwrap();
        let Mapping::Mapped { flags, blocks, .. } = m.map(0, 16, false).unwrap() else {
            panic!()
        };
        assert!(flags.boundary && blocks == 12);
        let Mapping::Mapped { flags, .. } = m.map(0, 5, false).unwrap() else {
            panic!()
        };
        assert!(
            !flags.boundary,
            "a run cut short by max_blocks does not reach the boundary"
        );
    }

    #[test]
    fn allocation_is_one_block_per_call_ascending_and_skips_used_blocks() {
        let mut m = ExtentMap::with_extents(4096, [Extent::new(10, 701, 2)]).unwrap();
        m.set_allocation_range(700..705);
        let got: Vec<Mapping> = (0..3).map(|b| m.map(b, 8, true).unwrap()).collect();
        let new = MapFlags {
            new: true,
            ..MapFlags::default()
        };
        assert_eq!(
            got[0],
            Mapping::Mapped {
                disk_block: 700,
                blocks: 1,
                flags: new
            }
        );
        assert_eq!(
            got[1],
            Mapping::Mapped {
                disk_block: 703,
                blocks: 1,
                flags: new
            },
            "701-702 are used"
        );
        assert_eq!(
            got[2],
            Mapping::Mapped {
                disk_block: 704,
                blocks: 1,
                flags: new
            }
        );
        assert!(matches!(
            m.map(3, 1, true),
            Err(MapError::NoSpace { file_block: 3, .. })
        ));
        // Blocks 1 and 2 went to 703, 704: merged into one extent.
        assert_eq!(m.map(1, 8, false).unwrap(), mapped(703, 2));
        assert_eq!(
            m.map(0, 8, true).unwrap(),
            mapped(700, 1),
            "an existing block is not reallocated"
        );
    }

    #[test]
    fn overlapping_extents_are_refused() {
        let mut m = ExtentMap::with_extents(1024, [Extent::new(0, 100, 4)]).unwrap();
        assert!(matches!(
            m.add_extent(Extent::new(3, 500, 2)),
            Err(ExtentError::FileOverlap { .. })
        ));
        assert!(matches!(
            m.add_extent(Extent::new(8, 98, 3)),
            Err(ExtentError::DiskOverlap { .. })
        ));
        assert!(matches!(
            m.add_extent(Extent::new(8, 0, 0)),
            Err(ExtentError::Empty { .. })
        ));
        m.add_extent(Extent::new(4, 104, 1)).unwrap();
    }

    #[test]
    fn truncate_releases_blocks_and_inline_data_converts_on_write() {
        let mut inl = Extent::new(0, 50, 3);
        inl.uptodate = true;
        let mut m = ExtentMap::with_extents(4096, [inl, Extent::new(3, 100, 5)]).unwrap();
        m.set_inline(1, vec![7; 10]);
        let mut buf = vec![1u8; 4096];
        m.read_inline(1, &mut buf).unwrap();
        assert_eq!(&buf[..10], &[7; 10]);
        assert!(buf[10..].iter().all(|&b| b == 0));
        assert_eq!(m.map(1, 1, true).unwrap(), mapped(51, 1));
        assert_eq!(
            m.map(1, 5, false).unwrap(),
            mapped(51, 1),
            "block 1 is plain now"
        );
        let Mapping::Mapped { flags, .. } = m.map(2, 1, false).unwrap() else {
            panic!()
        };
        assert!(flags.uptodate, "its neighbours keep their inline data");
        m.truncate(5).unwrap();
        assert_eq!(m.map(3, 8, false).unwrap(), mapped(100, 2));
        assert_eq!(m.map(5, 8, false).unwrap(), Mapping::Hole { blocks: 8 });
    }

    #[test]
    fn linear_maps_a_range_and_forgets_released_blocks() {
        let mut l = Linear::new(4096, 1000, 64);
        assert_eq!(l.map(3, 100, false).unwrap(), mapped(1003, 61));
        assert!(matches!(
            l.map(64, 1, false),
            Err(MapError::OutOfRange { .. })
        ));
        l.truncate(10).unwrap();
        assert_eq!(l.map(8, 100, false).unwrap(), mapped(1008, 2));
        assert_eq!(l.map(12, 100, false).unwrap(), Mapping::Hole { blocks: 52 });
        let Mapping::Mapped {
            disk_block: 1020,
            flags,
            ..
        } = l.map(20, 1, true).unwrap()
        else {
            panic!()
        };
        assert!(flags.new);
        assert_eq!(l.map(12, 100, false).unwrap(), Mapping::Hole { blocks: 8 });
        assert_eq!(l.map(20, 100, false).unwrap(), mapped(1020, 1));
    }
}
