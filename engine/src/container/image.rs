//! Whole-file images of older log files: read with direct I/O straight into page-aligned
//! memory on a blocking thread, and handed out as `Bytes` that own that memory.
//!
//! A reader catching up reads each older file whole once (to index it) and is then served
//! slices of the image. Reading through glommio's DMA buffers cost the shard a copy of every
//! byte into the image and the submission of every read; here a helper thread reads the file
//! into the image's own memory (the device writes it, nobody copies it), so the shard only
//! indexes it and sends slices. When the last slice of an image is dropped its memory goes
//! back to a small pool, so the next file is not read into fresh memory (whose pages would
//! be faulted in and zeroed on every file).

use bytes::Bytes;
use std::alloc::{Layout, alloc, dealloc};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of image memory (direct I/O needs block-aligned buffers).
const ALIGN: usize = 4096;
/// Image buffers kept for reuse, for all shards of the process.
const SPARES_MAX: usize = 2;

static SPARES: Mutex<Vec<RawBuf>> = Mutex::new(Vec::new());

/// Page-aligned heap memory.
struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: the memory is owned exclusively by this value; nothing else points at it.
unsafe impl Send for RawBuf {}

impl RawBuf {
    /// At least `size` bytes: a spare one if one is large enough, else fresh memory.
    fn take(size: usize) -> Self {
        let cap = size.div_ceil(ALIGN).max(1) * ALIGN;
        {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = spares.iter().position(|b| b.cap >= cap) {
                return spares.swap_remove(i);
            }
        }
        let layout = Layout::from_size_align(cap, ALIGN).expect("image layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, cap }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `cap` bytes owned by `self`; u8 has no invalid bit patterns, and the bytes
        // are only read after a read into them reported them filled.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `take` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align(self.cap, ALIGN).expect("image layout")) }
    }
}

/// The memory behind an image's `Bytes`; returned to the spares when the last is dropped.
struct Image {
    buf: Option<RawBuf>,
    len: usize,
}

impl AsRef<[u8]> for Image {
    fn as_ref(&self) -> &[u8] {
        let buf = self.buf.as_ref().expect("present until dropped");
        // SAFETY: the first `len` bytes were filled by reads.
        unsafe { std::slice::from_raw_parts(buf.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            if spares.len() < SPARES_MAX {
                spares.push(buf);
            }
        }
    }
}

/// Size of each read of a file image. One piece at a time: a whole 64 MiB file asked for at
/// once (the kernel splits it into many requests, a deep queue) held every log write on the
/// device behind it, and a reader catching up from older files took writers' acknowledgements
/// from 1 ms to 30-70 ms at p50 (p99 0.3-0.5 s); in 1 MiB pieces the same catch-up cost them
/// 2-5 ms at p50, and itself ran faster (docs/BENCHMARKS.md, twelfth session).
pub(crate) const READ_PIECE_BYTES: usize = 1 << 20;

/// Reads the whole file at `path` (blocking; run it on a helper thread), with direct I/O
/// where the file system allows it, in pieces of `READ_PIECE_BYTES`.
pub(crate) fn read_file(path: &Path) -> std::io::Result<Bytes> {
    let mut image = PartialImage::open(path)?;
    while !image.read_piece()? {}
    Ok(image.finish())
}

/// A file being read into an image one piece (`READ_PIECE_BYTES`) at a time, each piece a
/// blocking call of its own: a caller that paces its reads (the log scrub) can wait between
/// pieces without holding its helper thread.
pub(crate) struct PartialImage {
    file: File,
    buf: RawBuf,
    size: usize,
    done: usize,
}

impl PartialImage {
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = match File::options().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path)?,
            r => r?,
        };
        let size = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        Ok(Self { file, buf: RawBuf::take(size), size, done: 0 })
    }

    /// Bytes read so far.
    pub(crate) fn done(&self) -> usize {
        self.done
    }

    /// Reads the next piece (blocking); true once the whole file is read.
    pub(crate) fn read_piece(&mut self) -> std::io::Result<bool> {
        if self.done >= self.size {
            return Ok(true);
        }
        // Block-aligned lengths and offsets throughout.
        let end = self.size.div_ceil(ALIGN) * ALIGN; // within `buf.cap` (see `RawBuf::take`)
        let to = end.min(self.done + READ_PIECE_BYTES);
        let n = loop {
            match self.file.read_at(&mut self.buf.as_mut_slice()[self.done..to], self.done as u64) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        self.done += n;
        // A short read ends the file.
        Ok(n == 0 || !self.done.is_multiple_of(ALIGN) || self.done >= self.size)
    }

    /// The image of what was read.
    pub(crate) fn finish(self) -> Bytes {
        let len = self.done.min(self.size);
        Bytes::from_owner(Image { buf: Some(self.buf), len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_read_whole_files_and_their_memory_is_reused_once_every_slice_is_gone() {
        let dir = std::env::temp_dir().join(format!("sluice-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data: Vec<u8> = (0..3 * ALIGN + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        SPARES.lock().unwrap().clear();
        let a = read_file(&path).unwrap();
        assert_eq!(&a[..], &data[..], "an unaligned length reads whole");
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let slice = a.slice(ALIGN..ALIGN + 10);
        let ptr = a.as_ptr();
        drop(a);
        assert!(SPARES.lock().unwrap().is_empty(), "a slice still holds the memory");
        assert_eq!(&slice[..], &data[ALIGN..ALIGN + 10]);
        drop(slice);
        assert_eq!(SPARES.lock().unwrap().len(), 1);
        let b = read_file(&path).unwrap();
        assert_eq!((b.as_ptr(), &b[..]), (ptr, &data[..]), "the same memory, read again");
        assert!(SPARES.lock().unwrap().is_empty());
        let empty = dir.join("e");
        std::fs::write(&empty, b"").unwrap();
        assert!(read_file(&empty).unwrap().is_empty());
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
