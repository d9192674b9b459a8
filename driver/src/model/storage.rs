//! In-memory namespace contents: sparse, in fixed-size chunks allocated on first write, so a
//! namespace of any size costs memory only for what was written. Unwritten and deallocated
//! ranges read as zeros.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use vm_memory::VolatileSlice;

/// Bytes per chunk.
const CHUNK: u64 = 64 * 1024;

/// What unwritten chunks read as.
static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];

/// A hasher for chunk indexes: one multiply, which spreads consecutive indexes over the
/// table's top bits. Keys are never attacker controlled.
#[derive(Default)]
struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The bytes of one namespace.
#[derive(Default)]
pub(super) struct Storage {
    chunks: HashMap<u64, Box<[u8]>, BuildHasherDefault<ChunkHasher>>,
}

impl Storage {
    /// Call `f(chunk or None when unwritten, offset in chunk, length)` for each chunk piece of
    /// `[pos, pos + len)`.
    fn pieces(&self, pos: u64, len: u64, mut f: impl FnMut(Option<&[u8]>, usize, usize)) {
        let mut cur = pos;
        let end = pos + len;
        while cur < end {
            let off = cur % CHUNK;
            let n = (CHUNK - off).min(end - cur);
            f(
                self.chunks.get(&(cur / CHUNK)).map(|c| &c[..]),
                off as usize,
                n as usize,
            );
            cur += n;
        }
    }

    fn chunk_mut(&mut self, index: u64) -> &mut [u8] {
        self.chunks
            .entry(index)
            .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice())
    }

    /// Copy `[pos, pos + dst.len())` into device-visible memory.
    pub fn read_to(&self, pos: u64, dst: &VolatileSlice<'_>) {
        let mut done = 0;
        self.pieces(pos, dst.len() as u64, |chunk, off, n| {
            let src = match chunk {
                Some(c) => &c[off..off + n],
                None => &ZEROS[..n],
            };
            dst.subslice(done, n)
                .expect("piece inside the slice")
                .copy_from(src);
            done += n;
        });
    }

    /// Copy device-visible memory into `[pos, pos + src.len())`.
    pub fn write_from(&mut self, pos: u64, src: &VolatileSlice<'_>) {
        let mut cur = pos;
        let mut done = 0;
        while done < src.len() {
            let off = (cur % CHUNK) as usize;
            let n = (CHUNK as usize - off).min(src.len() - done);
            let chunk = self.chunk_mut(cur / CHUNK);
            src.subslice(done, n)
                .expect("piece inside the slice")
                .copy_to(&mut chunk[off..off + n]);
            done += n;
            cur += n as u64;
        }
    }

    /// Read `[pos, pos + buf.len())` into `buf`.
    pub fn read(&self, pos: u64, buf: &mut [u8]) {
        let mut done = 0;
        self.pieces(pos, buf.len() as u64, |chunk, off, n| {
            match chunk {
                Some(c) => buf[done..done + n].copy_from_slice(&c[off..off + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        });
    }

    /// Write `data` at `pos`.
    pub fn write(&mut self, pos: u64, data: &[u8]) {
        let mut cur = pos;
        let mut done = 0;
        while done < data.len() {
            let off = (cur % CHUNK) as usize;
            let n = (CHUNK as usize - off).min(data.len() - done);
            self.chunk_mut(cur / CHUNK)[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
            cur += n as u64;
        }
    }

    /// Whether `[pos, pos + data.len())` holds exactly `data`.
    pub fn equals(&self, pos: u64, data: &[u8]) -> bool {
        let mut done = 0;
        let mut same = true;
        self.pieces(pos, data.len() as u64, |chunk, off, n| {
            let theirs = &data[done..done + n];
            same &= match chunk {
                Some(c) => &c[off..off + n] == theirs,
                None => theirs.iter().all(|&b| b == 0),
            };
            done += n;
        });
        same
    }

    /// Zero `[pos, pos + len)`, giving back the memory of chunks that become entirely zero.
    pub fn zero(&mut self, pos: u64, len: u64) {
        let mut cur = pos;
        let end = pos + len;
        while cur < end {
            let index = cur / CHUNK;
            let off = cur % CHUNK;
            let n = (CHUNK - off).min(end - cur);
            if n == CHUNK {
                self.chunks.remove(&index);
            } else if let Some(c) = self.chunks.get_mut(&index) {
                c[off as usize..(off + n) as usize].fill(0);
            }
            cur += n;
        }
    }

    /// Bytes of memory held for written data.
    #[cfg(test)]
    pub fn resident(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_zero() {
        let mut s = Storage::default();
        let mut buf = vec![0xffu8; 3 * CHUNK as usize];
        s.read(1 << 40, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(s.resident(), 0);
        let data: Vec<u8> = (0..CHUNK as usize + 100).map(|i| (i % 251) as u8).collect();
        let pos = (1 << 40) + CHUNK - 50;
        s.write(pos, &data);
        assert_eq!(s.resident(), 3 * CHUNK);
        let mut back = vec![0u8; data.len()];
        s.read(pos, &mut back);
        assert_eq!(back, data);
        assert!(s.equals(pos, &data));
        assert!(!s.equals(pos, &back[1..]));
        // Zeroing the whole middle chunk gives it back.
        s.zero(pos, data.len() as u64);
        assert_eq!(s.resident(), 2 * CHUNK);
        s.read(pos, &mut back);
        assert!(back.iter().all(|&b| b == 0));
        assert!(s.equals(pos, &[0; 10]));
    }

    #[test]
    fn volatile_copies() {
        let mut s = Storage::default();
        let mut mem = vec![0u8; 3 * CHUNK as usize];
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let vs = VolatileSlice::from(&mut mem[..]);
        s.write_from(CHUNK / 2, &vs);
        let mut out = vec![0u8; 3 * CHUNK as usize + 10];
        let vo = VolatileSlice::from(&mut out[..]);
        s.read_to(CHUNK / 2 - 10, &vo);
        assert!(out[..10].iter().all(|&b| b == 0));
        assert_eq!(&out[10..], &mem[..]);
    }
}
