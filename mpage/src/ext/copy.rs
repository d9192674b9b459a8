//! Reading a whole file through the page cache.

use std::io::Write;

use crate::backend::BlockIo;
use crate::cache::{FileId, PageCache};
use crate::error::MpageError;

/// Bytes asked of the cache per read when copying a whole file: one readahead window of
/// 256 pages per call, so a contiguous file goes out in commands of up to 1 MiB (fewer
/// bytes where the device's max transfer is smaller).
pub const COPY_CHUNK: usize = 1 << 20;

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The cache could not read the file.
    #[error(transparent)]
    Read(#[from] MpageError),
    /// The destination refused the data.
    #[error("writing the file's data out: {0}")]
    Write(#[source] std::io::Error),
    /// The cache returned fewer bytes than the file size.
    #[error("the file ended after {got} of its {size} bytes")]
    Short { got: u64, size: u64 },
}

/// Read the open file `f` from start to end through `cache`, [`COPY_CHUNK`] bytes at a
/// time, writing everything to `out` straight from the cache's frames (no copy into a buffer
/// of our own: [`PageCache::read_with`]). Returns the bytes copied.
pub fn copy_file<D: BlockIo>(
    cache: &mut PageCache<D>,
    f: FileId,
    out: &mut dyn Write,
) -> Result<u64, CopyError> {
    let size = cache.file_size(f)?;
    let mut done = 0u64;
    let mut failed = None;
    while done < size {
        let n = cache.read_with(f, done, COPY_CHUNK, |_, bytes| {
            if failed.is_none() {
                failed = out.write_all(bytes).err();
            }
        })?;
        if let Some(e) = failed {
            return Err(CopyError::Write(e));
        }
        if n == 0 {
            return Err(CopyError::Short { got: done, size });
        }
        done += n as u64;
    }
    Ok(done)
}
