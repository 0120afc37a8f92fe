//! The one place where flatmerge maps files into memory.

use std::fs::File;
use std::ops::Deref;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps all of `file` read-only.
    ///
    /// # Safety
    /// The bytes of a map change if the file is written or truncated by
    /// another process while the map lives (a truncation turns reads into
    /// SIGBUS). The caller must ensure — in practice: document and assume —
    /// that checkpoint files are not modified while a merge reads them.
    /// Nothing in flatmerge writes to a file it has mapped.
    pub(crate) unsafe fn map(file: &File) -> std::io::Result<MappedFile> {
        // SAFETY: forwarded to our caller, see above.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(MappedFile { map })
    }
}

impl MappedFile {
    /// Lets the kernel drop this process's mapping of `range` (its pages
    /// stay in the page cache and come back on the next access), so that
    /// reading a large model tensor by tensor keeps the resident set at a
    /// few tensors. Advisory: failures are ignored.
    pub(crate) fn release(&self, range: std::ops::Range<usize>) {
        // The kernel maps pages around each faulting one ("fault-around",
        // 64 KiB by default), so reading a tensor also maps the tail of the
        // one before it; widening the range releases those too (a neighbour
        // still in use simply faults its pages in again).
        const FAULT_AROUND: usize = 256 << 10;
        let range = range.start.saturating_sub(FAULT_AROUND)
            ..range.end.saturating_add(FAULT_AROUND).min(self.map.len());
        #[cfg(unix)]
        if range.start < range.end {
            // SAFETY: the map is read-only and never written through, so
            // dropping its pages loses nothing: a later read faults the
            // file's bytes in again.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.end - range.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}
