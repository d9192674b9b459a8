//! A file's cached pages: page index → frame index.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::page::NIL;

/// Pages per chunk of a [`PageIndex`]: 1 MiB of file per 1 KiB chunk, so a file's tree stays
/// shallow (a 1 GiB file fully cached has 1 024 chunks) and neighbours share a chunk.
pub(crate) const CHUNK_PAGES: u64 = 256;

/// No chunk: a key no page has (page indexes are `u64`, so keys stop at `u64::MAX / 256`).
const NO_KEY: u64 = u64::MAX;

/// A file's cached pages: page index → frame index, kept in chunks of 256 consecutive pages
/// found through an ordered map. Lookups take `&self` and change nothing but a hint (the
/// index is `Sync`); walks in page order — writeback, truncation, close — follow the map's
/// order with no sorting.
///
/// The hint is the chunk used last: a sequential reader, readahead and eviction of a stream
/// touch 256 pages of one chunk in a row, and each of those finds it without a search of the
/// map (a search is a dozen dependent loads, per page, on the cache's hottest path).
#[derive(Default)]
pub(crate) struct PageIndex {
    /// Chunk key (page / 256) → place in `slab`.
    map: BTreeMap<u64, usize>,
    slab: Vec<IndexChunk>,
    /// Places in `slab` of chunks no longer used.
    free: Vec<usize>,
    /// Place in `slab` of the chunk used last (checked against its key before use; a stale
    /// or racing value only costs a search). Relaxed: it orders nothing.
    hint: AtomicUsize,
    /// Pages recorded.
    len: usize,
}

struct IndexChunk {
    /// The chunk's key, [`NO_KEY`] while its place is free.
    key: u64,
    /// Entries that are not [`NIL`].
    used: u32,
    frames: Box<[u32; CHUNK_PAGES as usize]>,
}

#[inline]
fn split(p: u64) -> (u64, usize) {
    (p / CHUNK_PAGES, (p % CHUNK_PAGES) as usize)
}

impl PageIndex {
    /// The place in the slab of chunk `key`, if it exists.
    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        let h = self.hint.load(Ordering::Relaxed);
        if self.slab.get(h).is_some_and(|c| c.key == key) {
            return Some(h);
        }
        self.search(key)
    }

    /// [`Self::find`] past the hint: out of line, so the hinted path stays a few
    /// instructions where it is inlined.
    #[cold]
    #[inline(never)]
    fn search(&self, key: u64) -> Option<usize> {
        let at = *self.map.get(&key)?;
        self.hint.store(at, Ordering::Relaxed);
        Some(at)
    }

    /// A new, empty chunk `key`; returns its place in the slab.
    #[cold]
    #[inline(never)]
    fn add_chunk(&mut self, key: u64) -> usize {
        let chunk = IndexChunk {
            key,
            used: 0,
            frames: Box::new([NIL; CHUNK_PAGES as usize]),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i] = chunk;
                i
            }
            None => {
                self.slab.push(chunk);
                self.slab.len() - 1
            }
        };
        self.map.insert(key, i);
        *self.hint.get_mut() = i;
        i
    }

    /// Forget the emptied chunk at `i`.
    #[cold]
    #[inline(never)]
    fn drop_chunk(&mut self, i: usize) {
        let key = std::mem::replace(&mut self.slab[i].key, NO_KEY);
        self.map.remove(&key);
        self.free.push(i);
    }

    /// The frame of page `p`.
    #[inline]
    pub(crate) fn get(&self, p: u64) -> Option<u32> {
        let (key, at) = split(p);
        let fr = self.slab[self.find(key)?].frames[at];
        (fr != NIL).then_some(fr)
    }

    /// Record page `p` in frame `fr`; returns the frame it was in before.
    #[inline]
    pub(crate) fn insert(&mut self, p: u64, fr: u32) -> Option<u32> {
        debug_assert_ne!(fr, NIL);
        let (key, at) = split(p);
        let i = match self.find(key) {
            Some(i) => i,
            None => self.add_chunk(key),
        };
        let c = &mut self.slab[i];
        let old = std::mem::replace(&mut c.frames[at], fr);
        if old == NIL {
            c.used += 1;
            self.len += 1;
            None
        } else {
            Some(old)
        }
    }

    /// Forget page `p`; returns its frame.
    #[inline]
    pub(crate) fn remove(&mut self, p: u64) -> Option<u32> {
        let (key, at) = split(p);
        let i = self.find(key)?;
        let c = &mut self.slab[i];
        let old = std::mem::replace(&mut c.frames[at], NIL);
        if old == NIL {
            return None;
        }
        c.used -= 1;
        self.len -= 1;
        if c.used == 0 {
            self.drop_chunk(i);
        }
        Some(old)
    }

    /// How many pages from `p` on, at most `max`, are not recorded, counted within `p`'s chunk
    /// (a caller goes on from the chunk's end): one search for a stretch of pages.
    #[inline]
    pub(crate) fn absent_run(&self, p: u64, max: u64) -> u64 {
        let (key, at) = split(p);
        let max = max.min(CHUNK_PAGES - at as u64) as usize;
        match self.find(key) {
            None => max as u64,
            Some(i) => self.slab[i].frames[at..at + max]
                .iter()
                .take_while(|&&fr| fr == NIL)
                .count() as u64,
        }
    }

    /// The frames of pages `p..=last`, as far as `p`'s chunk goes, copied into `out` ([`NIL`]
    /// for pages not recorded); returns how many.
    #[inline]
    pub(crate) fn frames_from(
        &self,
        p: u64,
        last: u64,
        out: &mut [u32; CHUNK_PAGES as usize],
    ) -> usize {
        let (key, at) = split(p);
        let n = (last - p + 1).min(CHUNK_PAGES - at as u64) as usize;
        match self.find(key) {
            None => out[..n].fill(NIL),
            Some(i) => out[..n].copy_from_slice(&self.slab[i].frames[at..at + n]),
        }
        n
    }

    /// Pages recorded.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// (page, frame) pairs from page `first` on, ascending.
    pub(crate) fn iter_from(&self, first: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.range(first, u64::MAX)
    }

    /// (page, frame) pairs of pages `first..end`, ascending.
    pub(crate) fn range(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        let from = first / CHUNK_PAGES;
        let to = end.div_ceil(CHUNK_PAGES);
        self.map
            .range(from..to.max(from))
            .flat_map(|(&k, &i)| {
                self.slab[i]
                    .frames
                    .iter()
                    .enumerate()
                    .filter(|&(_, &fr)| fr != NIL)
                    .map(move |(j, &fr)| (k * CHUNK_PAGES + j as u64, fr))
            })
            .skip_while(move |&(p, _)| p < first)
            .take_while(move |&(p, _)| p < end)
    }

    /// Every (page, frame) pair, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.iter_from(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    #[test]
    fn index_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PageIndex>();
    }

    proptest! {
        /// The index behaves as an ordered map from page to frame: same lookups, same
        /// ordered walks, chunks dropped when emptied.
        #[test]
        fn index_matches_an_ordered_map(
            ops in proptest::collection::vec((0u8..3, 0u64..2_000, 0u32..1_000), 1..400),
            first in 0u64..2_100,
            len in 0u64..1_500,
        ) {
            let mut idx = PageIndex::default();
            let mut model = Model::new();
            for (op, p, fr) in ops {
                // Pages far apart too: the high bits pick a distant chunk.
                let p = if p % 7 == 0 { p << 20 } else { p };
                match op {
                    0 | 1 => prop_assert_eq!(idx.insert(p, fr), model.insert(p, fr)),
                    _ => prop_assert_eq!(idx.remove(p), model.remove(&p)),
                }
                prop_assert_eq!(idx.get(p), model.get(&p).copied());
                prop_assert_eq!(idx.len(), model.len());
                // The stretch of absent pages from p: as long as the model's, within p's chunk.
                let max = fr as u64 % 300;
                let chunk_end = (p / CHUNK_PAGES + 1) * CHUNK_PAGES;
                let want = (p..p + max.min(chunk_end - p))
                    .take_while(|q| !model.contains_key(q))
                    .count() as u64;
                prop_assert_eq!(idx.absent_run(p, max), want);
                // The frames from p to p + max (within p's chunk), as the model has them.
                let mut out = [0u32; CHUNK_PAGES as usize];
                let n = idx.frames_from(p, p + max, &mut out);
                prop_assert_eq!(n as u64, (max + 1).min(chunk_end - p));
                for (k, &fr) in out[..n].iter().enumerate() {
                    prop_assert_eq!(fr, model.get(&(p + k as u64)).copied().unwrap_or(NIL));
                }
            }
            let all: Vec<_> = model.iter().map(|(&p, &f)| (p, f)).collect();
            prop_assert_eq!(idx.iter().collect::<Vec<_>>(), all);
            let from: Vec<_> = model.range(first..).map(|(&p, &f)| (p, f)).collect();
            prop_assert_eq!(idx.iter_from(first).collect::<Vec<_>>(), from);
            let end = first + len;
            let part: Vec<_> = model.range(first..end).map(|(&p, &f)| (p, f)).collect();
            prop_assert_eq!(idx.range(first, end).collect::<Vec<_>>(), part);
            let chunks: std::collections::BTreeSet<u64> =
                model.keys().map(|p| p / CHUNK_PAGES).collect();
            prop_assert_eq!(idx.map.len(), chunks.len());
            // Every place in the slab is a chunk of the map or free, never both.
            prop_assert_eq!(idx.map.len() + idx.free.len(), idx.slab.len());
        }
    }
}
