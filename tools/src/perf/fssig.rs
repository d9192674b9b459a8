//! Recognisable on-disk signatures in the first blocks of a namespace: a write benchmark asks
//! for confirmation before it overwrites a file system or a partition table.

use std::fmt;

/// Bytes to read from the start of a namespace to see every signature below (the btrfs
/// superblock sits at 64 KiB).
pub const PROBE_BYTES: usize = 128 << 10;

/// A signature that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// What it is: "ext4 file system", "GPT partition table", …
    pub what: &'static str,
    /// Byte offset of the magic number.
    pub offset: usize,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (magic at byte {})", self.what, self.offset)
    }
}

fn le16(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(off..off + 2)?.try_into().ok()?))
}

fn le32(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off + 4)?.try_into().ok()?))
}

fn bytes_at(d: &[u8], off: usize, magic: &[u8]) -> bool {
    d.get(off..off + magic.len()) == Some(magic)
}

/// ext2/3/4: superblock at byte 1024, s_magic 0xEF53 at 1024 + 56. A bare 16-bit magic
/// matches random data one time in 65 536, so the superblock must also look sane.
fn ext(d: &[u8]) -> Option<Signature> {
    const SB: usize = 1024;
    if le16(d, SB + 56)? != 0xef53 {
        return None;
    }
    let inodes = le32(d, SB)?;
    let blocks = le32(d, SB + 4)?;
    let log_block = le32(d, SB + 24)?;
    let rev = le32(d, SB + 76)?;
    if inodes == 0 || blocks == 0 || log_block > 6 || rev > 1 {
        return None;
    }
    let compat = le32(d, SB + 92)?;
    let incompat = le32(d, SB + 96)?;
    // INCOMPAT_EXTENTS | 64BIT | FLEX_BG: ext4; COMPAT_HAS_JOURNAL: ext3.
    let what = if incompat & (0x40 | 0x80 | 0x200) != 0 {
        "ext4 file system"
    } else if compat & 0x4 != 0 {
        "ext3 file system"
    } else {
        "ext2 file system"
    };
    Some(Signature {
        what,
        offset: SB + 56,
    })
}

/// The signatures found in `data`, the first bytes of a namespace with `lba_size`-byte LBAs.
pub fn detect(data: &[u8], lba_size: u32) -> Vec<Signature> {
    let mut found = Vec::new();
    // GPT header in LBA 1 (look at both usual block sizes: the table may have been written
    // through a device of the other size).
    let mut gpt = false;
    for off in [lba_size as usize, 512, 4096] {
        if !gpt && bytes_at(data, off, b"EFI PART") {
            found.push(Signature {
                what: "GPT partition table",
                offset: off,
            });
            gpt = true;
        }
    }
    if !gpt && bytes_at(data, 510, &[0x55, 0xaa]) {
        let used = (0..4).any(|i| data.get(446 + 16 * i + 4).is_some_and(|&t| t != 0));
        if used {
            found.push(Signature {
                what: "MBR partition table",
                offset: 510,
            });
        }
    }
    if bytes_at(data, 0, b"XFSB") {
        found.push(Signature {
            what: "XFS file system",
            offset: 0,
        });
    }
    if let Some(s) = ext(data) {
        found.push(s);
    }
    if bytes_at(data, 0x10040, b"_BHRfS_M") {
        found.push(Signature {
            what: "btrfs file system",
            offset: 0x10040,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> Vec<u8> {
        vec![0; PROBE_BYTES]
    }

    fn ext_image(compat: u32, incompat: u32) -> Vec<u8> {
        let mut d = blank();
        d[1024..1028].copy_from_slice(&65536u32.to_le_bytes());
        d[1028..1032].copy_from_slice(&262144u32.to_le_bytes());
        d[1048..1052].copy_from_slice(&2u32.to_le_bytes());
        d[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
        d[1100..1104].copy_from_slice(&1u32.to_le_bytes());
        d[1116..1120].copy_from_slice(&compat.to_le_bytes());
        d[1120..1124].copy_from_slice(&incompat.to_le_bytes());
        d
    }

    #[test]
    fn nothing_on_blank_or_random_data() {
        assert!(detect(&blank(), 4096).is_empty());
        let mut r = crate::perf::gen::Rng::new(5);
        let mut d: Vec<u8> = (0..PROBE_BYTES).map(|_| r.next_u64() as u8).collect();
        // The ext magic alone, in random data, is not a file system.
        d[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
        d[1048..1052].copy_from_slice(&1000u32.to_le_bytes());
        assert!(detect(&d, 512).is_empty(), "{:?}", detect(&d, 512));
        // Nor is a short read.
        assert!(detect(&[0; 10], 512).is_empty());
    }

    #[test]
    fn ext_flavours() {
        assert_eq!(detect(&ext_image(0, 0), 4096)[0].what, "ext2 file system");
        assert_eq!(detect(&ext_image(4, 0), 4096)[0].what, "ext3 file system");
        let s = detect(&ext_image(4, 0x2c2), 4096);
        assert_eq!(
            s,
            [Signature {
                what: "ext4 file system",
                offset: 1080
            }]
        );
        assert_eq!(s[0].to_string(), "ext4 file system (magic at byte 1080)");
    }

    #[test]
    fn xfs_btrfs_gpt_mbr() {
        let mut d = blank();
        d[0..4].copy_from_slice(b"XFSB");
        assert_eq!(detect(&d, 512)[0].what, "XFS file system");

        let mut d = blank();
        d[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(detect(&d, 4096)[0].what, "btrfs file system");

        let mut d = blank();
        d[510] = 0x55;
        d[511] = 0xaa;
        assert!(detect(&d, 512).is_empty(), "boot signature, no partition");
        d[446 + 4] = 0xee;
        assert_eq!(detect(&d, 512)[0].what, "MBR partition table");
        d[4096..4104].copy_from_slice(b"EFI PART");
        let s = detect(&d, 4096);
        assert_eq!(
            s,
            [Signature {
                what: "GPT partition table",
                offset: 4096
            }],
            "a protective MBR is reported as the GPT it protects"
        );
    }
}
