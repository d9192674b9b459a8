//! The pattern: blocks that say where and when they were written (a header with a CRC),
//! and what a block read back that is not the expected one looks like (stale, torn, foreign).

use super::*;

// ----- the pattern -----

/// splitmix64's finaliser.
#[inline]
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator of a block's body: splitmix64 from a state derived from all three keys.
pub(super) struct Fill(u64);

impl Fill {
    pub(super) fn new(seed: u64, generation: u32, lba: u64) -> Fill {
        Fill(mix(
            seed ^ mix(lba ^ mix(generation as u64 ^ 0x6a09_e667_f3bc_c909))
        ))
    }

    #[inline]
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

/// Who a pattern block says it is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The LBA it was written to.
    pub lba: u64,
    /// The seed of the run that wrote it.
    pub seed: u64,
    /// The generation of that run.
    pub generation: u32,
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The CRC a block should carry: of everything but the CRC field itself.
pub(super) fn block_crc(block: &[u8]) -> u32 {
    // CRC-32 as in IEEE 802.3, zlib and gzip (crc32fast: table-driven or SIMD, as the CPU allows).
    let mut h = crc32fast::Hasher::new();
    h.update(&block[..CRC_AT]);
    h.update(&block[HEADER_LEN..]);
    h.finalize()
}

/// Fill `block` (one LBA: at least [`HEADER_LEN`] bytes, a multiple of 8) with the pattern of
/// `stamp`.
pub fn encode(block: &mut [u8], stamp: Stamp) {
    debug_assert!(block.len() >= HEADER_LEN && block.len().is_multiple_of(8));
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&stamp.lba.to_le_bytes());
    block[16..24].copy_from_slice(&stamp.seed.to_le_bytes());
    block[24..28].copy_from_slice(&stamp.generation.to_le_bytes());
    let mut f = Fill::new(stamp.seed, stamp.generation, stamp.lba);
    for w in block[HEADER_LEN..].chunks_exact_mut(8) {
        w.copy_from_slice(&f.next().to_le_bytes());
    }
    let crc = block_crc(block);
    block[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// What the header of `block` says, if it has the magic; and whether its CRC matches.
pub fn decode(block: &[u8]) -> Option<(Stamp, bool)> {
    if block.len() < HEADER_LEN || u64_at(block, 0) != MAGIC {
        return None;
    }
    let stamp = Stamp {
        lba: u64_at(block, 8),
        seed: u64_at(block, 16),
        generation: u32_at(block, 24),
    };
    Some((stamp, block_crc(block) == u32_at(block, CRC_AT)))
}

/// What is wrong with a block.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A pattern block of another LBA.
    Misdirected,
    /// A block of this LBA from another seed or generation.
    Stale,
    /// Header right, whole sectors after the first wrong.
    Torn,
    /// All zeros.
    Zero,
    /// Anything else.
    Corrupt,
}

impl Class {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Class::Misdirected => "misdirected",
            Class::Stale => "stale",
            Class::Torn => "torn",
            Class::Zero => "zero",
            Class::Corrupt => "corrupt",
        }
    }
}

/// One block that is not what was written there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The LBA.
    pub lba: u64,
    /// What is wrong.
    pub class: Class,
    /// The LBA, seed and generation its header names, if it has a pattern header.
    pub found_lba: Option<u64>,
    pub found_seed: Option<u64>,
    pub found_generation: Option<u32>,
    /// Whether its CRC matches its content (a self-consistent block).
    pub checksum_ok: bool,
    /// Bytes that differ from the expected block.
    pub bad_bytes: u32,
    /// Offset of the first of them.
    pub first_bad: u32,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LBA {}: {}", self.lba, self.class.name())?;
        match (self.found_lba, self.found_seed, self.found_generation) {
            (Some(l), Some(s), Some(g)) => write!(
                f,
                ": carries LBA {l}, seed {s:#x}, generation {g}, checksum {}",
                if self.checksum_ok { "ok" } else { "bad" }
            )?,
            _ => write!(f, ": no pattern header")?,
        }
        write!(
            f,
            "; {} bytes differ from the expected block, the first at byte {}",
            self.bad_bytes, self.first_bad
        )
    }
}

/// Count the bytes of `a` that differ from `b`, and the first such offset.
pub(super) fn diff(a: &[u8], b: &[u8]) -> (u32, u32) {
    let mut n = 0u32;
    let mut first = None;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            n += 1;
            first.get_or_insert(i as u32);
        }
    }
    (n, first.unwrap_or(0))
}

/// Whether the differences of a block whose header is right look like a torn write: the
/// first sector (with the header) is intact and every other differing sector differs in at
/// least three quarters of its 8-byte words (replaced as a whole, not damaged here and there).
pub(super) fn looks_torn(block: &[u8], expected: &[u8]) -> bool {
    let sector = SECTOR.min(block.len());
    let mut any = false;
    for (i, (s, e)) in block
        .chunks(sector)
        .zip(expected.chunks(sector))
        .enumerate()
    {
        let words = s.len() / 8;
        let differ = s
            .chunks_exact(8)
            .zip(e.chunks_exact(8))
            .filter(|(x, y)| x != y)
            .count();
        if differ == 0 {
            continue;
        }
        if i == 0 || differ * 4 < words * 3 {
            return false;
        }
        any = true;
    }
    any
}

/// Whether the first sector of `block` is that of the pattern of `stamp` (but for the CRC,
/// which covers the whole block). Overwrites `scratch`.
pub(super) fn first_sector_is(block: &[u8], stamp: Stamp, scratch: &mut [u8]) -> bool {
    encode(scratch, stamp);
    let n = SECTOR.min(block.len());
    block[..CRC_AT] == scratch[..CRC_AT] && block[HEADER_LEN..n] == scratch[HEADER_LEN..n]
}

/// Check `block`, read from the LBA of `want`, against the pattern of `want`. `scratch` (the
/// block size) receives the expected block. None when the block is exactly as expected.
pub fn classify(block: &[u8], want: Stamp, scratch: &mut [u8]) -> Option<Mismatch> {
    encode(scratch, want);
    if block == scratch {
        return None;
    }
    let decoded = decode(block);
    let (bad_bytes, first_bad) = diff(block, scratch);
    let torn = decoded.is_some_and(|(s, _)| s == want) && looks_torn(block, scratch);
    let mut m = Mismatch {
        lba: want.lba,
        class: Class::Corrupt,
        found_lba: None,
        found_seed: None,
        found_generation: None,
        checksum_ok: false,
        bad_bytes,
        first_bad,
    };
    match decoded {
        Some((stamp, crc_ok)) => {
            m.found_lba = Some(stamp.lba);
            m.found_seed = Some(stamp.seed);
            m.found_generation = Some(stamp.generation);
            m.checksum_ok = crc_ok;
            m.class = if stamp == want {
                if torn {
                    Class::Torn
                } else {
                    Class::Corrupt
                }
            } else if crc_ok || first_sector_is(block, stamp, scratch) {
                // A whole block of another LBA or run (its first sector at least: it may be
                // torn as well). A damaged header is corruption, not a stray block.
                if stamp.lba != want.lba {
                    Class::Misdirected
                } else {
                    Class::Stale
                }
            } else {
                Class::Corrupt
            };
        }
        None if block.iter().all(|&b| b == 0) => m.class = Class::Zero,
        None => {}
    }
    Some(m)
}
