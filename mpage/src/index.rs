//! A file's cached pages: page index → frame index.

use std::collections::BTreeMap;

use crate::page::NIL;

/// Pages per chunk of a [`PageIndex`]: 1 MiB of file per 1 KiB chunk, so a file's tree stays
/// shallow (a 1 GiB file fully cached has 1 024 chunks) and neighbours share a chunk.
const CHUNK_PAGES: u64 = 256;

/// A file's cached pages: page index → frame index, kept in an ordered map of chunks of 256
/// consecutive pages. Lookups take `&self` and mutate nothing (the index is `Sync`); walks in
/// page order — writeback, truncation, close — follow the map's order with no sorting.
#[derive(Default)]
pub(crate) struct PageIndex {
    chunks: BTreeMap<u64, Box<IndexChunk>>,
    /// Pages recorded.
    len: usize,
}

struct IndexChunk {
    /// Entries that are not [`NIL`].
    used: u32,
    frames: [u32; CHUNK_PAGES as usize],
}

#[inline]
fn split(p: u64) -> (u64, usize) {
    (p / CHUNK_PAGES, (p % CHUNK_PAGES) as usize)
}

impl PageIndex {
    /// The frame of page `p`.
    #[inline]
    pub(crate) fn get(&self, p: u64) -> Option<u32> {
        let (key, at) = split(p);
        let fr = self.chunks.get(&key)?.frames[at];
        (fr != NIL).then_some(fr)
    }

    /// Record page `p` in frame `fr`; returns the frame it was in before.
    pub(crate) fn insert(&mut self, p: u64, fr: u32) -> Option<u32> {
        debug_assert_ne!(fr, NIL);
        let (key, at) = split(p);
        let c = self.chunks.entry(key).or_insert_with(|| {
            Box::new(IndexChunk {
                used: 0,
                frames: [NIL; CHUNK_PAGES as usize],
            })
        });
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
    pub(crate) fn remove(&mut self, p: u64) -> Option<u32> {
        let (key, at) = split(p);
        let c = self.chunks.get_mut(&key)?;
        let old = std::mem::replace(&mut c.frames[at], NIL);
        if old == NIL {
            return None;
        }
        c.used -= 1;
        self.len -= 1;
        if c.used == 0 {
            self.chunks.remove(&key);
        }
        Some(old)
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
        self.chunks
            .range(from..to.max(from))
            .flat_map(|(&k, c)| {
                c.frames
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
            prop_assert_eq!(idx.chunks.len(), chunks.len());
        }
    }
}
