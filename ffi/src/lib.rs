//! The C ABI of flatmerge (`include/flatmerge.h`, generated from this
//! crate by the pinned cbindgen of `tests/header.rs`).
//!
//! Conventions, as in rustls-ffi:
//! - every function that can fail returns a [`flatmerge_status`] with
//!   stable numbers, and leaves a message for [`flatmerge_last_error`];
//! - every exported function runs its body through the one panic boundary
//!   ([`status::boundary`], or [`status::call`] on top of it): a panic
//!   becomes `FLATMERGE_STATUS_PANIC`, never an unwind into C;
//! - every pointer is checked (NULL is an error code), every length too
//!   (zero, mismatched, overflowing, misaligned or overlapping buffers are
//!   `FLATMERGE_STATUS_INVALID_ARGUMENT`), before the first output is
//!   written: outputs are written only on success;
//! - handles are opaque, owned by the caller from `_new` to `_free`.
//!
//! The functions are faces of the library: they check, convert, call
//! `flatmerge` and report. No merge logic lives here.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod args;
pub mod status;

// The header declares the C API in the order of these modules.
pub mod merge;

pub mod recorder;

pub mod kernels;

pub mod cuda;

pub use cuda::*;
pub use kernels::*;
pub use merge::*;
pub use recorder::*;
pub use status::flatmerge_status;

use status::{boundary, copy_out, last_error};
use std::ffi::c_char;

/// The library version as a NUL-terminated string with static lifetime,
/// e.g. `"0.1.0"`; the caller must not free it. Thread-safe.
#[no_mangle]
pub extern "C" fn flatmerge_version() -> *const c_char {
    boundary(std::ptr::null(), || {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
    })
}

/// Copies the calling thread's last error message into `buf` (capacity
/// `len` bytes, NUL included) and returns the size a whole copy needs, NUL
/// included: a result greater than `len` means the copy was truncated (at
/// a UTF-8 character boundary, always NUL-terminated when `len > 0`).
/// `buf` may be NULL with `len` 0 to ask for the size.
///
/// The message is set by every function that returns a status: the error
/// text (naming the file, tensor or argument) on failure, empty on success
/// (the result is then 1). Functions that return no status leave it
/// unchanged, except `flatmerge_recorder_free` when it detects a wrong
/// handle. Thread-safe: each thread has its own message.
///
/// # Safety
/// A non-NULL `buf` must be valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_last_error(buf: *mut c_char, len: usize) -> usize {
    boundary(0, || {
        // SAFETY: the caller's contract.
        unsafe { copy_out(&last_error(), buf, len) }
    })
}

/// Copies a one-sentence description of the status code `status` into
/// `buf` (capacity `len` bytes, NUL included) and returns the size a whole
/// copy needs, NUL included, as `flatmerge_last_error`. An unknown code is
/// described as such. Thread-safe.
///
/// # Safety
/// A non-NULL `buf` must be valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_status_describe(
    status: u32,
    buf: *mut c_char,
    len: usize,
) -> usize {
    boundary(0, || {
        let text = match flatmerge_status::from_code(status) {
            Some(s) => s.describe().to_string(),
            None => format!("unknown status code {status}"),
        };
        // SAFETY: the caller's contract.
        unsafe { copy_out(&text, buf, len) }
    })
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

    #[test]
    fn unknown_codes_are_described() {
        let mut buf = [0 as c_char; 64];
        let n = unsafe { flatmerge_status_describe(12345, buf.as_mut_ptr(), buf.len()) };
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(text, "unknown status code 12345");
        assert_eq!(n, text.len() + 1);
    }
}
