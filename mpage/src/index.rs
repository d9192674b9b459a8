//! A file's cached pages: page index → frame index.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::page::NIL;
/// Pages per chunk of a [`PageIndex`].
const CHUNK_PAGES: u64 = 64;

/// A file's cached pages: page index → frame index, in chunks of 64 consecutive pages found
/// through a hash table, with the last chunk used remembered (readers and readahead walk
/// pages in order, so most lookups skip the table). Walks in page order sort the chunks.
#[derive(Default)]
pub(crate) struct PageIndex {
    /// Chunk number → position in `chunks`.
    by_key: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    chunks: Vec<IndexChunk>,
    /// The chunk found last: (chunk number + 1, position); 0 for none.
    last: Cell<(u64, u32)>,
}

struct IndexChunk {
    key: u64,
    /// Entries that are not [`NIL`].
    used: u32,
    frames: [u32; CHUNK_PAGES as usize],
}

/// A multiplicative hash for chunk numbers (they are not chosen by an adversary).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl PageIndex {
    pub(crate) fn position(&self, key: u64) -> Option<usize> {
        let (k, i) = self.last.get();
        if k == key + 1 {
            return Some(i as usize);
        }
        let i = *self.by_key.get(&key)?;
        self.last.set((key + 1, i));
        Some(i as usize)
    }

    /// The frame of page `p`.
    pub(crate) fn get(&self, p: u64) -> Option<u32> {
        let i = self.position(p / CHUNK_PAGES)?;
        let fr = self.chunks[i].frames[(p % CHUNK_PAGES) as usize];
        (fr != NIL).then_some(fr)
    }

    /// Record page `p` in frame `fr`; returns the frame it was in before.
    pub(crate) fn insert(&mut self, p: u64, fr: u32) -> Option<u32> {
        let key = p / CHUNK_PAGES;
        let i = match self.position(key) {
            Some(i) => i,
            None => {
                let i = self.chunks.len();
                self.chunks.push(IndexChunk {
                    key,
                    used: 0,
                    frames: [NIL; CHUNK_PAGES as usize],
                });
                self.by_key.insert(key, i as u32);
                self.last.set((key + 1, i as u32));
                i
            }
        };
        let c = &mut self.chunks[i];
        let old = std::mem::replace(&mut c.frames[(p % CHUNK_PAGES) as usize], fr);
        if old == NIL {
            c.used += 1;
            None
        } else {
            Some(old)
        }
    }

    /// Forget page `p`; returns its frame.
    pub(crate) fn remove(&mut self, p: u64) -> Option<u32> {
        let key = p / CHUNK_PAGES;
        let i = self.position(key)?;
        let c = &mut self.chunks[i];
        let old = std::mem::replace(&mut c.frames[(p % CHUNK_PAGES) as usize], NIL);
        if old == NIL {
            return None;
        }
        c.used -= 1;
        if c.used == 0 {
            self.by_key.remove(&key);
            self.chunks.swap_remove(i);
            if let Some(moved) = self.chunks.get(i) {
                self.by_key.insert(moved.key, i as u32);
            }
            self.last.set((0, 0));
        }
        Some(old)
    }

    /// (page, frame) pairs from page `first` on, ascending.
    pub(crate) fn iter_from(&self, first: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut order: Vec<(u64, u32)> = self
            .by_key
            .iter()
            .filter(|&(&k, _)| k >= first / CHUNK_PAGES)
            .map(|(&k, &i)| (k, i))
            .collect();
        order.sort_unstable();
        order
            .into_iter()
            .flat_map(move |(k, i)| {
                self.chunks[i as usize]
                    .frames
                    .iter()
                    .enumerate()
                    .filter(|&(_, &fr)| fr != NIL)
                    .map(move |(j, &fr)| (k * CHUNK_PAGES + j as u64, fr))
            })
            .filter(move |&(p, _)| p >= first)
    }

    /// Every (page, frame) pair, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.iter_from(0)
    }
}
