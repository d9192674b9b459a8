//! The superblock and the group descriptors.
//!
//! The superblock is 1024 bytes at byte 1024 of the file system, whatever the block size.
//! Group descriptors (32 bytes, or `s_desc_size` with the `64bit` feature) follow in the
//! block after the superblock's, or with `meta_bg` in the first block of each meta group.
//! `flex_bg` and `sparse_super` move the tables and the backup superblocks around, but the
//! descriptors say where each group's inode table is, so they need nothing beyond that here.

use super::le::{u16_at, u32_at};

/// Byte offset of the superblock.
pub(crate) const SUPERBLOCK_OFFSET: u64 = 1024;
/// Its length.
pub(crate) const SUPERBLOCK_LEN: usize = 1024;
/// `s_magic`.
pub(crate) const EXT_MAGIC: u16 = 0xEF53;
/// Offset of `s_magic` inside the superblock.
pub(crate) const MAGIC_AT: usize = 0x38;

/// `s_feature_compat` bits.
pub mod compat {
    pub const DIR_PREALLOC: u32 = 0x1;
    pub const IMAGIC_INODES: u32 = 0x2;
    pub const HAS_JOURNAL: u32 = 0x4;
    pub const EXT_ATTR: u32 = 0x8;
    pub const RESIZE_INODE: u32 = 0x10;
    pub const DIR_INDEX: u32 = 0x20;
    pub const SPARSE_SUPER2: u32 = 0x200;
}

/// `s_feature_incompat` bits.
pub mod incompat {
    pub const COMPRESSION: u32 = 0x1;
    pub const FILETYPE: u32 = 0x2;
    pub const RECOVER: u32 = 0x4;
    pub const JOURNAL_DEV: u32 = 0x8;
    pub const META_BG: u32 = 0x10;
    pub const EXTENTS: u32 = 0x40;
    pub const BIT64: u32 = 0x80;
    pub const MMP: u32 = 0x100;
    pub const FLEX_BG: u32 = 0x200;
    pub const EA_INODE: u32 = 0x400;
    pub const DIRDATA: u32 = 0x1000;
    pub const CSUM_SEED: u32 = 0x2000;
    pub const LARGEDIR: u32 = 0x4000;
    pub const INLINE_DATA: u32 = 0x8000;
    pub const ENCRYPT: u32 = 0x10000;
    pub const CASEFOLD: u32 = 0x20000;
}

/// `s_feature_ro_compat` bits (a reader may ignore them all: they only constrain writers).
pub mod ro_compat {
    pub const SPARSE_SUPER: u32 = 0x1;
    pub const LARGE_FILE: u32 = 0x2;
    pub const HUGE_FILE: u32 = 0x8;
    pub const METADATA_CSUM: u32 = 0x400;
}

/// Incompatible features this reader handles. Encryption is handled by refusing the
/// encrypted files; casefolded directories are searched by exact name.
const SUPPORTED_INCOMPAT: u32 = incompat::FILETYPE
    | incompat::META_BG
    | incompat::EXTENTS
    | incompat::BIT64
    | incompat::MMP
    | incompat::FLEX_BG
    | incompat::EA_INODE
    | incompat::CSUM_SEED
    | incompat::LARGEDIR
    | incompat::INLINE_DATA
    | incompat::ENCRYPT
    | incompat::CASEFOLD;

const COMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "dir_prealloc"),
    (0x2, "imagic_inodes"),
    (0x4, "has_journal"),
    (0x8, "ext_attr"),
    (0x10, "resize_inode"),
    (0x20, "dir_index"),
    (0x40, "lazy_bg"),
    (0x80, "snapshot_bitmap"),
    (0x200, "sparse_super2"),
    (0x400, "fast_commit"),
    (0x800, "stable_inodes"),
    (0x1000, "orphan_file"),
];

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "compression"),
    (0x2, "filetype"),
    (0x4, "needs_recovery"),
    (0x8, "journal_dev"),
    (0x10, "meta_bg"),
    (0x40, "extent"),
    (0x80, "64bit"),
    (0x100, "mmp"),
    (0x200, "flex_bg"),
    (0x400, "ea_inode"),
    (0x1000, "dirdata"),
    (0x2000, "metadata_csum_seed"),
    (0x4000, "large_dir"),
    (0x8000, "inline_data"),
    (0x10000, "encrypt"),
    (0x20000, "casefold"),
];

const RO_COMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "sparse_super"),
    (0x2, "large_file"),
    (0x4, "btree_dir"),
    (0x8, "huge_file"),
    (0x10, "uninit_bg"),
    (0x20, "dir_nlink"),
    (0x40, "extra_isize"),
    (0x80, "snapshot"),
    (0x100, "quota"),
    (0x200, "bigalloc"),
    (0x400, "metadata_csum"),
    (0x800, "replica"),
    (0x1000, "read-only"),
    (0x2000, "project"),
    (0x4000, "shared_blocks"),
    (0x8000, "verity"),
    (0x10000, "orphan_present"),
];

/// Names of the bits set in `bits`, unknown ones as `FLAG(0x...)`.
fn names(bits: u32, table: &[(u32, &str)], kind: &str) -> Vec<String> {
    (0..32)
        .map(|i| 1u32 << i)
        .filter(|b| bits & b != 0)
        .map(|b| match table.iter().find(|(v, _)| *v == b) {
            Some((_, n)) => n.to_string(),
            None => format!("unknown {kind} feature {b:#x}"),
        })
        .collect()
}

/// Why a superblock was refused (the caller adds the device name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SuperError {
    Magic(u16),
    NeedsRecovery,
    Unsupported(Vec<String>),
    BlockSize(u64, String),
    Corrupt(String),
}

/// The fields of the superblock the reader uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// `s_inodes_count`.
    pub inodes_count: u32,
    /// `s_blocks_count` (with the high half under `64bit`).
    pub blocks_count: u64,
    /// `s_first_data_block` (1 with 1 KiB blocks, else 0).
    pub first_data_block: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// `s_blocks_per_group`.
    pub blocks_per_group: u32,
    /// `s_inodes_per_group`.
    pub inodes_per_group: u32,
    /// `s_rev_level` (0: fixed 128-byte inodes).
    pub rev_level: u32,
    /// Bytes per on-disk inode.
    pub inode_size: u32,
    /// Bytes per group descriptor.
    pub desc_size: u32,
    /// `s_feature_compat`.
    pub feature_compat: u32,
    /// `s_feature_incompat`.
    pub feature_incompat: u32,
    /// `s_feature_ro_compat`.
    pub feature_ro_compat: u32,
    /// `s_first_meta_bg`.
    pub first_meta_bg: u32,
    /// `s_backup_bgs` (`sparse_super2`).
    pub backup_bgs: [u32; 2],
    /// `s_state` (1: cleanly unmounted).
    pub state: u16,
    /// `s_volume_name`.
    pub volume_name: String,
    /// Number of block groups.
    pub groups: u32,
}

impl Superblock {
    /// Parse and check the 1024 bytes of a superblock.
    pub(crate) fn parse(b: &[u8]) -> Result<Superblock, SuperError> {
        let magic = u16_at(b, MAGIC_AT);
        if magic != EXT_MAGIC {
            return Err(SuperError::Magic(magic));
        }
        let feature_compat = u32_at(b, 0x5C);
        let feature_incompat = u32_at(b, 0x60);
        let feature_ro_compat = u32_at(b, 0x64);
        if feature_incompat & incompat::RECOVER != 0 {
            return Err(SuperError::NeedsRecovery);
        }
        let unknown = feature_incompat & !SUPPORTED_INCOMPAT;
        if unknown != 0 {
            return Err(SuperError::Unsupported(names(
                unknown,
                INCOMPAT_NAMES,
                "incompatible",
            )));
        }
        let log_bs = u32_at(b, 0x18);
        if log_bs > 2 {
            let bs = 1024u64.checked_shl(log_bs).unwrap_or(0);
            return Err(SuperError::BlockSize(
                bs,
                "blocks larger than 4096 bytes do not fit in a page of the cache".into(),
            ));
        }
        let block_size = 1024u32 << log_bs;
        let rev_level = u32_at(b, 0x4C);
        let inode_size = if rev_level == 0 {
            128
        } else {
            u16_at(b, 0x58) as u32
        };
        let corrupt = |s: String| Err(SuperError::Corrupt(s));
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
            return corrupt(format!("inode size {inode_size} in the superblock"));
        }
        let bit64 = feature_incompat & incompat::BIT64 != 0;
        let desc_size = if bit64 { u16_at(b, 0xFE) as u32 } else { 32 };
        if bit64 && (desc_size < 64 || !desc_size.is_power_of_two() || desc_size > block_size) {
            return corrupt(format!(
                "group descriptor size {desc_size} in the superblock"
            ));
        }
        let mut blocks_count = u32_at(b, 0x04) as u64;
        if bit64 {
            blocks_count |= (u32_at(b, 0x150) as u64) << 32;
        }
        let first_data_block = u32_at(b, 0x14);
        let blocks_per_group = u32_at(b, 0x20);
        let inodes_per_group = u32_at(b, 0x28);
        if blocks_per_group == 0 || inodes_per_group == 0 {
            return corrupt(format!(
                "{blocks_per_group} blocks and {inodes_per_group} inodes per group"
            ));
        }
        if blocks_count <= first_data_block as u64 {
            return corrupt(format!(
                "{blocks_count} blocks, first data block {first_data_block}"
            ));
        }
        let groups = (blocks_count - first_data_block as u64).div_ceil(blocks_per_group as u64);
        let Ok(groups) = u32::try_from(groups) else {
            return corrupt(format!("{groups} block groups"));
        };
        let inodes_count = u32_at(b, 0x00);
        if (inodes_count as u64) > groups as u64 * inodes_per_group as u64 {
            return corrupt(format!(
                "{inodes_count} inodes in {groups} groups of {inodes_per_group}"
            ));
        }
        let volume_name = String::from_utf8_lossy(&b[0x78..0x88])
            .trim_end_matches('\0')
            .to_string();
        Ok(Superblock {
            inodes_count,
            blocks_count,
            first_data_block,
            block_size,
            blocks_per_group,
            inodes_per_group,
            rev_level,
            inode_size,
            desc_size,
            feature_compat,
            feature_incompat,
            feature_ro_compat,
            first_meta_bg: u32_at(b, 0x104),
            backup_bgs: [u32_at(b, 0x24C), u32_at(b, 0x250)],
            state: u16_at(b, 0x3A),
            volume_name,
            groups,
        })
    }

    /// Whether an incompatible feature is on.
    pub fn has_incompat(&self, bit: u32) -> bool {
        self.feature_incompat & bit != 0
    }

    /// Whether a compatible feature is on.
    pub fn has_compat(&self, bit: u32) -> bool {
        self.feature_compat & bit != 0
    }

    /// Whether a read-only-compatible feature is on.
    pub fn has_ro_compat(&self, bit: u32) -> bool {
        self.feature_ro_compat & bit != 0
    }

    /// "ext2", "ext3" or "ext4", as `blkid` would say.
    pub fn kind(&self) -> &'static str {
        let ext4_only = incompat::EXTENTS
            | incompat::BIT64
            | incompat::FLEX_BG
            | incompat::INLINE_DATA
            | incompat::META_BG
            | incompat::CSUM_SEED
            | incompat::LARGEDIR
            | incompat::ENCRYPT
            | incompat::CASEFOLD
            | incompat::EA_INODE
            | incompat::MMP;
        let ext4_ro = ro_compat::HUGE_FILE | ro_compat::METADATA_CSUM | 0x10 | 0x20 | 0x40;
        if self.feature_incompat & ext4_only != 0 || self.feature_ro_compat & ext4_ro != 0 {
            "ext4"
        } else if self.has_compat(compat::HAS_JOURNAL) {
            "ext3"
        } else {
            "ext2"
        }
    }

    /// Names of the features that are on, compatible ones first.
    pub fn feature_names(&self) -> Vec<String> {
        let mut v = names(self.feature_compat, COMPAT_NAMES, "compatible");
        v.extend(names(self.feature_incompat, INCOMPAT_NAMES, "incompatible"));
        v.extend(names(
            self.feature_ro_compat,
            RO_COMPAT_NAMES,
            "read-only compatible",
        ));
        v
    }

    /// First block of group `g`.
    fn group_first_block(&self, g: u32) -> u64 {
        self.first_data_block as u64 + g as u64 * self.blocks_per_group as u64
    }

    /// Whether group `g` holds a copy of the superblock (and so of the descriptors).
    pub(crate) fn group_has_super(&self, g: u32) -> bool {
        if g == 0 {
            return true;
        }
        if self.has_compat(compat::SPARSE_SUPER2) {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if g == 1 || !self.has_ro_compat(ro_compat::SPARSE_SUPER) {
            return true;
        }
        [3u32, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                match p.checked_mul(base) {
                    Some(n) => p = n,
                    None => return false,
                }
            }
            p == g
        })
    }

    /// Byte offset of the descriptor of group `g`.
    pub(crate) fn desc_offset(&self, g: u32) -> u64 {
        let bs = self.block_size as u64;
        let per_block = self.block_size / self.desc_size;
        let meta_group = g / per_block;
        let block = if self.has_incompat(incompat::META_BG) && meta_group >= self.first_meta_bg {
            let first = meta_group * per_block;
            self.group_first_block(first) + self.group_has_super(first) as u64
        } else {
            self.first_data_block as u64 + 1 + meta_group as u64
        };
        block * bs + (g % per_block) as u64 * self.desc_size as u64
    }

    /// The inode table's first block from a group descriptor.
    pub(crate) fn inode_table(&self, desc: &[u8]) -> u64 {
        let lo = u32_at(desc, 0x08) as u64;
        if self.desc_size >= 64 {
            lo | (u32_at(desc, 0x28) as u64) << 32
        } else {
            lo
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(log_bs: u32, incompat: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x38..0x3A].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        b[0x00..0x04].copy_from_slice(&64u32.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&8192u32.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        b[0x18..0x1C].copy_from_slice(&log_bs.to_le_bytes());
        b[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes());
        b[0x28..0x2C].copy_from_slice(&64u32.to_le_bytes());
        b[0x4C..0x50].copy_from_slice(&1u32.to_le_bytes());
        b[0x58..0x5A].copy_from_slice(&256u16.to_le_bytes());
        b[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        b
    }

    #[test]
    fn features_are_checked_and_named() {
        let s = Superblock::parse(&sb(0, incompat::FILETYPE | incompat::EXTENTS)).unwrap();
        assert_eq!(
            (s.block_size, s.groups, s.inode_size, s.desc_size),
            (1024, 1, 256, 32)
        );
        assert_eq!(s.kind(), "ext4");
        assert_eq!(
            Superblock::parse(&sb(0, incompat::RECOVER | incompat::FILETYPE)),
            Err(SuperError::NeedsRecovery)
        );
        assert_eq!(
            Superblock::parse(&sb(0, incompat::COMPRESSION | 0x8000_0000)),
            Err(SuperError::Unsupported(vec![
                "compression".into(),
                "unknown incompatible feature 0x80000000".into()
            ]))
        );
        assert!(matches!(
            Superblock::parse(&sb(4, 0)),
            Err(SuperError::BlockSize(16384, _))
        ));
        let mut bad = sb(0, 0);
        bad[0x38] = 0;
        assert_eq!(Superblock::parse(&bad), Err(SuperError::Magic(0xEF00)));
    }

    #[test]
    fn backup_superblocks_follow_sparse_super() {
        let mut b = sb(2, 0);
        b[0x64..0x68].copy_from_slice(&ro_compat::SPARSE_SUPER.to_le_bytes());
        let s = Superblock::parse(&b).unwrap();
        let with: Vec<u32> = (0..130).filter(|&g| s.group_has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    #[test]
    fn descriptors_sit_after_the_superblock_or_in_their_meta_group() {
        // 4 KiB blocks, 64-byte descriptors: 64 per block.
        let mut b = sb(2, incompat::BIT64 | incompat::META_BG);
        b[0x14..0x18].copy_from_slice(&0u32.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&(8192u32 * 200).to_le_bytes());
        b[0x00..0x04].copy_from_slice(&(64u32 * 200).to_le_bytes());
        b[0xFE..0x100].copy_from_slice(&64u16.to_le_bytes());
        b[0x104..0x108].copy_from_slice(&1u32.to_le_bytes());
        b[0x64..0x68].copy_from_slice(&ro_compat::SPARSE_SUPER.to_le_bytes());
        let s = Superblock::parse(&b).unwrap();
        assert_eq!(s.groups, 200);
        assert_eq!(s.desc_offset(3), 4096 + 3 * 64, "meta group 0 is classic");
        // Group 70 is in meta group 1, whose first group (64) has no superblock backup.
        assert_eq!(s.desc_offset(70), 64 * 8192 * 4096 + 6 * 64);
        // Group 130 is in meta group 2 (first group 128): no backup either.
        assert_eq!(s.desc_offset(130), 128 * 8192 * 4096 + 2 * 64);
        let mut d = vec![0u8; 64];
        d[0x08..0x0C].copy_from_slice(&7u32.to_le_bytes());
        d[0x28..0x2C].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(s.inode_table(&d), (1 << 32) | 7);
    }
}
