//! What the fuzz targets share: a scratch directory for the files the
//! parsers read (they read files, as flatmerge does, so that the fuzzed
//! path is the real one: open, size checks, memory map, parse), and the
//! property every target checks besides "no panic": an error names a file.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory of this process's own, in memory where `/dev/shm` exists.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("flatmerge-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
        dir
    })
}

/// Writes `bytes` to `name` in the scratch directory; returns its path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("write a fuzz input");
    path
}

/// Panics (a finding) unless a failed parse names a file among `allowed`
/// (or one inside the directory `allowed[0]` when it is a directory).
pub fn check_names_file<T>(result: flatmerge::Result<T>, allowed: &[&Path]) {
    let Err(e) = result else { return };
    let file = e
        .file()
        .unwrap_or_else(|| panic!("error without a file: {e}"));
    assert!(
        allowed.iter().any(|a| file == *a || file.starts_with(a)),
        "error names {} rather than the input: {e}",
        file.display()
    );
}
