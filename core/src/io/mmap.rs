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

impl Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}
