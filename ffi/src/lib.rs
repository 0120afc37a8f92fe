//! The C ABI of flatmerge (`include/flatmerge.h`).
//!
//! This first surface exposes the version; merges, the recorder and the
//! slice kernels follow the same conventions: status codes, no panic across
//! the boundary, borrowed pointers documented per function.

use std::ffi::c_char;

/// The library version as a NUL-terminated string with static lifetime;
/// the caller must not free it. Thread-safe.
#[no_mangle]
pub extern "C" fn flatmerge_version() -> *const c_char {
    // The version is a compile-time constant: nothing here can panic.
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The version of the Rust library linked in, for callers that check
/// that the C ABI and the engine agree.
pub fn engine_version() -> &'static str {
    engine::VERSION
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_is_the_engine_version() {
        let v = unsafe { CStr::from_ptr(flatmerge_version()) };
        assert_eq!(v.to_str().unwrap(), engine_version());
    }
}
