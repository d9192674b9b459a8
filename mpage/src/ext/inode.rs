//! Inodes: the on-disk fields the reader uses, file types, and inline data.

use std::fmt;

use super::le::{u16_at, u32_at};

/// Inode number of the root directory.
pub const ROOT_INO: u32 = 2;

/// `i_flags` bits.
pub mod flags {
    /// The file is encrypted (fscrypt).
    pub const ENCRYPT: u32 = 0x800;
    /// The directory has an htree index.
    pub const INDEX: u32 = 0x1000;
    /// The file's blocks are mapped by an extent tree.
    pub const EXTENTS: u32 = 0x8_0000;
    /// The file's data lives in the inode.
    pub const INLINE_DATA: u32 = 0x1000_0000;
    /// The directory's names are case-insensitive.
    pub const CASEFOLD: u32 = 0x4000_0000;
}

/// Bytes of `i_block`.
pub const I_BLOCK_LEN: usize = 60;
/// Offset of `i_block` in the inode.
const I_BLOCK_AT: usize = 0x28;
/// The part of an inode every revision has.
const GOOD_OLD_INODE_SIZE: usize = 128;
/// In-inode extended attributes start with this.
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// Attribute name index of `system.*`.
const XATTR_INDEX_SYSTEM: u8 = 7;

/// What kind of file an inode is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Unknown,
}

impl FileType {
    /// From the `S_IFMT` bits of `i_mode`.
    pub fn from_mode(mode: u16) -> FileType {
        match mode & 0xF000 {
            0x8000 => FileType::Regular,
            0x4000 => FileType::Directory,
            0xA000 => FileType::Symlink,
            0x2000 => FileType::CharDevice,
            0x6000 => FileType::BlockDevice,
            0x1000 => FileType::Fifo,
            0xC000 => FileType::Socket,
            _ => FileType::Unknown,
        }
    }

    /// From the `file_type` byte of a directory entry.
    pub fn from_dirent(t: u8) -> FileType {
        match t {
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::CharDevice,
            4 => FileType::BlockDevice,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => FileType::Unknown,
        }
    }

    /// A short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            FileType::Regular => "file",
            FileType::Directory => "dir",
            FileType::Symlink => "symlink",
            FileType::CharDevice => "chardev",
            FileType::BlockDevice => "blockdev",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            FileType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One inode as read from the inode table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Its number.
    pub ino: u32,
    /// `i_mode`: type and permissions.
    pub mode: u16,
    /// Size in bytes (`i_size_lo` and `i_size_high`).
    pub size: u64,
    /// `i_flags`.
    pub flags: u32,
    /// `i_links_count`.
    pub links: u16,
    /// `i_mtime` (seconds).
    pub mtime: u32,
    /// `i_block`: block pointers, the extent tree root, inline data or a fast symlink.
    pub block: [u8; I_BLOCK_LEN],
    /// The bytes after the first 128 (extra fields and in-inode extended attributes).
    pub extra: Vec<u8>,
}

impl Inode {
    /// Parse an on-disk inode (`raw` is the inode size long, at least 128 bytes).
    pub(crate) fn parse(ino: u32, raw: &[u8]) -> Inode {
        let mut block = [0u8; I_BLOCK_LEN];
        block.copy_from_slice(&raw[I_BLOCK_AT..I_BLOCK_AT + I_BLOCK_LEN]);
        Inode {
            ino,
            mode: u16_at(raw, 0x00),
            size: u32_at(raw, 0x04) as u64 | (u32_at(raw, 0x6C) as u64) << 32,
            flags: u32_at(raw, 0x20),
            links: u16_at(raw, 0x1A),
            mtime: u32_at(raw, 0x10),
            block,
            extra: raw[GOOD_OLD_INODE_SIZE..].to_vec(),
        }
    }

    /// What kind of file it is.
    pub fn file_type(&self) -> FileType {
        FileType::from_mode(self.mode)
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }

    /// Whether it is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.file_type() == FileType::Symlink
    }

    /// Whether a flag of [`flags`] is set.
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether its data lives in the inode.
    pub fn is_inline(&self) -> bool {
        self.has_flag(flags::INLINE_DATA)
    }

    /// Whether it is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.has_flag(flags::ENCRYPT)
    }

    /// A symlink whose target is stored in `i_block` itself.
    pub fn is_fast_symlink(&self) -> bool {
        self.is_symlink()
            && !self.is_inline()
            && !self.has_flag(flags::EXTENTS)
            && self.size < I_BLOCK_LEN as u64
    }

    /// The `i_block` words (block pointers of the legacy scheme).
    pub(crate) fn block_words(&self) -> [u32; 15] {
        std::array::from_fn(|i| u32_at(&self.block, i * 4))
    }

    /// The value of the in-inode extended attribute `system.data` (the part of inline data
    /// beyond `i_block`); `Err` says what is malformed.
    pub(crate) fn inline_xattr(&self) -> Result<Vec<u8>, String> {
        let e = &self.extra;
        if e.len() < 4 {
            return Err("128-byte inodes cannot hold inline data attributes".into());
        }
        let start = u16_at(e, 0) as usize;
        if !start.is_multiple_of(4) || start > e.len() {
            return Err(format!("i_extra_isize {start} does not fit the inode"));
        }
        if start + 4 > e.len() {
            return Ok(Vec::new());
        }
        if u32_at(e, start) != XATTR_MAGIC {
            return Ok(Vec::new());
        }
        let entries = start + 4;
        let mut at = entries;
        while at + 16 <= e.len() && u32_at(e, at) != 0 {
            let name_len = e[at] as usize;
            let index = e[at + 1];
            let value_offs = u16_at(e, at + 2) as usize;
            let value_inum = u32_at(e, at + 4);
            let value_size = u32_at(e, at + 8) as usize;
            let name_end = at + 16 + name_len;
            if name_end > e.len() {
                return Err(format!(
                    "extended attribute at byte {at} runs past the inode"
                ));
            }
            if index == XATTR_INDEX_SYSTEM && &e[at + 16..name_end] == b"data" {
                if value_inum != 0 {
                    return Err("system.data is stored in an attribute inode".into());
                }
                let from = entries + value_offs;
                if from + value_size > e.len() {
                    return Err(format!(
                        "system.data value at {from}+{value_size} runs past the inode"
                    ));
                }
                return Ok(e[from..from + value_size].to_vec());
            }
            at = (name_end + 3) & !3;
        }
        Ok(Vec::new())
    }

    /// The whole content of an inline file (`size` bytes).
    pub(crate) fn inline_data(&self) -> Result<Vec<u8>, String> {
        let size = self.size as usize;
        let mut data = self.block[..size.min(I_BLOCK_LEN)].to_vec();
        if size > I_BLOCK_LEN {
            let more = self.inline_xattr()?;
            if I_BLOCK_LEN + more.len() < size {
                return Err(format!(
                    "inline data holds {} bytes for a size of {size}",
                    I_BLOCK_LEN + more.len()
                ));
            }
            data.extend_from_slice(&more[..size - I_BLOCK_LEN]);
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 256-byte inode with `data` inline.
    fn inline_inode(data: &[u8]) -> Inode {
        let mut raw = vec![0u8; 256];
        raw[0..2].copy_from_slice(&0x81A4u16.to_le_bytes());
        raw[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        raw[0x20..0x24].copy_from_slice(&flags::INLINE_DATA.to_le_bytes());
        let head = data.len().min(60);
        raw[0x28..0x28 + head].copy_from_slice(&data[..head]);
        raw[128..130].copy_from_slice(&32u16.to_le_bytes());
        let x = 128 + 32;
        raw[x..x + 4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        // One entry: system.data, value at the end of the inode.
        let rest = &data[head..];
        let e = x + 4;
        let value_at = 256 - ((rest.len() + 3) & !3);
        raw[e] = 4;
        raw[e + 1] = XATTR_INDEX_SYSTEM;
        raw[e + 2..e + 4].copy_from_slice(&((value_at - (x + 4)) as u16).to_le_bytes());
        raw[e + 8..e + 12].copy_from_slice(&(rest.len() as u32).to_le_bytes());
        raw[e + 16..e + 20].copy_from_slice(b"data");
        raw[value_at..value_at + rest.len()].copy_from_slice(rest);
        Inode::parse(12, &raw)
    }

    #[test]
    fn inline_data_joins_i_block_and_the_attribute() {
        let data: Vec<u8> = (0..100u8).collect();
        let i = inline_inode(&data);
        assert!(i.is_inline() && i.file_type() == FileType::Regular);
        assert_eq!(i.inline_data().unwrap(), data);
        let short = inline_inode(b"hello");
        assert_eq!(short.inline_data().unwrap(), b"hello");
        let mut lying = inline_inode(&data);
        lying.size = 200;
        assert!(lying.inline_data().unwrap_err().contains("holds 100 bytes"));
    }

    #[test]
    fn sizes_and_types_from_the_raw_inode() {
        let mut raw = vec![0u8; 128];
        raw[0..2].copy_from_slice(&0xA1FFu16.to_le_bytes());
        raw[4..8].copy_from_slice(&5u32.to_le_bytes());
        raw[0x6C..0x70].copy_from_slice(&1u32.to_le_bytes());
        raw[0x28..0x2D].copy_from_slice(b"a/b/c");
        let i = Inode::parse(20, &raw);
        assert_eq!(i.size, (1 << 32) + 5);
        assert!(
            i.is_symlink() && !i.is_fast_symlink(),
            "too long for i_block"
        );
        raw[0x6C..0x70].copy_from_slice(&0u32.to_le_bytes());
        assert!(Inode::parse(20, &raw).is_fast_symlink());
        assert_eq!(FileType::from_dirent(2), FileType::Directory);
    }
}
