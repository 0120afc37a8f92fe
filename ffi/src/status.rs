//! Status codes, the thread-local last error, and the panic boundary that
//! every exported function goes through.

use engine::{Error, ErrorKind};
use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The result of every call that can fail. The numbers are stable: a code
/// keeps its number in every later version, and new codes get new numbers.
/// Codes 1–99 are the library's error kinds, 100 and above misuse of the
/// C API. The describe and last-error functions take a code as a plain
/// `uint32_t`, so an unknown number is no trouble there.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum flatmerge_status {
    /// Success.
    Ok = 0,
    /// A file could not be opened, read, written or renamed.
    Io = 1,
    /// A checkpoint file is not valid safetensors.
    Format = 2,
    /// A tensor has a dtype flatmerge does not merge.
    UnsupportedDtype = 3,
    /// A PyTorch pickle checkpoint, which flatmerge never loads.
    Pickle = 4,
    /// A checkpoint path holds nothing flatmerge can read.
    NotFound = 5,
    /// An activation statistics file is malformed or does not fit the weights.
    Stats = 6,
    /// A merge config is malformed (unknown key, wrong type, bad value).
    Config = 7,
    /// Names, shapes or statistics of the inputs do not fit together.
    Plan = 8,
    /// The output exists and `force` was not set.
    OutputExists = 9,
    /// A value is not allowed (for example a NaN where numbers are needed).
    InvalidInput = 10,
    /// The caller cancelled the merge; nothing was written.
    Cancelled = 11,
    /// No usable CUDA device: flatmerge was built without the `cuda`
    /// feature, the driver or NVRTC library is missing, or there is no such
    /// device. The message says which; kernels that fall back run on the CPU.
    NoDevice = 12,
    /// A CUDA call failed (allocation, copy, launch, kernel compilation).
    Device = 13,
    /// An error of a kind this version of the C API has no code for.
    OtherError = 99,
    /// A pointer argument that must not be NULL was NULL.
    NullPointer = 100,
    /// An argument is out of range: a zero or mismatched length, a length
    /// whose byte size overflows, a misaligned or overlapping buffer, an
    /// unknown enumeration value, a parameter outside its domain.
    InvalidArgument = 101,
    /// A string argument (a path, a name, YAML text) is not valid UTF-8.
    InvalidUtf8 = 102,
    /// flatmerge panicked: a bug, please report it with the message. The
    /// call's outputs are unspecified; handles stay usable.
    Panic = 103,
    /// A handle argument is not a live handle of the expected type (freed,
    /// or never returned by flatmerge). Detection is best effort.
    WrongHandle = 104,
}

/// Every code, for the describe function and the tests.
const ALL: [flatmerge_status; 20] = [
    flatmerge_status::Ok,
    flatmerge_status::Io,
    flatmerge_status::Format,
    flatmerge_status::UnsupportedDtype,
    flatmerge_status::Pickle,
    flatmerge_status::NotFound,
    flatmerge_status::Stats,
    flatmerge_status::Config,
    flatmerge_status::Plan,
    flatmerge_status::OutputExists,
    flatmerge_status::InvalidInput,
    flatmerge_status::Cancelled,
    flatmerge_status::NoDevice,
    flatmerge_status::Device,
    flatmerge_status::OtherError,
    flatmerge_status::NullPointer,
    flatmerge_status::InvalidArgument,
    flatmerge_status::InvalidUtf8,
    flatmerge_status::Panic,
    flatmerge_status::WrongHandle,
];

impl flatmerge_status {
    /// The code of a library error kind.
    pub fn of_kind(kind: ErrorKind) -> flatmerge_status {
        match kind {
            ErrorKind::Io => flatmerge_status::Io,
            ErrorKind::Format => flatmerge_status::Format,
            ErrorKind::UnsupportedDtype => flatmerge_status::UnsupportedDtype,
            ErrorKind::Pickle => flatmerge_status::Pickle,
            ErrorKind::NotFound => flatmerge_status::NotFound,
            ErrorKind::Stats => flatmerge_status::Stats,
            ErrorKind::Config => flatmerge_status::Config,
            ErrorKind::Plan => flatmerge_status::Plan,
            ErrorKind::OutputExists => flatmerge_status::OutputExists,
            ErrorKind::InvalidInput => flatmerge_status::InvalidInput,
            ErrorKind::Cancelled => flatmerge_status::Cancelled,
            _ => flatmerge_status::OtherError,
        }
    }

    /// The code with number `code`, if there is one.
    pub fn from_code(code: u32) -> Option<flatmerge_status> {
        ALL.into_iter().find(|s| *s as u32 == code)
    }

    /// What the code means, in one sentence.
    pub fn describe(self) -> &'static str {
        match self {
            flatmerge_status::Ok => "success",
            flatmerge_status::Io => "a file could not be opened, read, written or renamed",
            flatmerge_status::Format => "a checkpoint file is not valid safetensors",
            flatmerge_status::UnsupportedDtype => "a tensor has a dtype flatmerge does not merge",
            flatmerge_status::Pickle => "a PyTorch pickle checkpoint, which flatmerge never loads",
            flatmerge_status::NotFound => "a checkpoint path holds nothing flatmerge can read",
            flatmerge_status::Stats => {
                "an activation statistics file is malformed or does not fit the weights"
            }
            flatmerge_status::Config => "the merge config is malformed",
            flatmerge_status::Plan => {
                "names, shapes or statistics of the inputs do not fit together"
            }
            flatmerge_status::OutputExists => "the output exists and `force` was not set",
            flatmerge_status::InvalidInput => "a value is not allowed",
            flatmerge_status::Cancelled => "the merge was cancelled; nothing was written",
            flatmerge_status::NoDevice => "no usable CUDA device",
            flatmerge_status::Device => "a CUDA call failed",
            flatmerge_status::OtherError => "an error this version of the C API has no code for",
            flatmerge_status::NullPointer => "a pointer argument was NULL",
            flatmerge_status::InvalidArgument => "an argument is out of range or inconsistent",
            flatmerge_status::InvalidUtf8 => "a string argument is not valid UTF-8",
            flatmerge_status::Panic => "flatmerge panicked (a bug; please report it)",
            flatmerge_status::WrongHandle => "not a live handle of the expected type",
        }
    }
}

/// A failed call: its status and the message kept as the last error.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: flatmerge_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: flatmerge_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn null(name: &str) -> Self {
        Failure::new(flatmerge_status::NullPointer, format!("`{name}` is NULL"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(flatmerge_status::InvalidArgument, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(flatmerge_status::of_kind(e.kind()), e.to_string())
    }
}

pub(crate) type Outcome<T = ()> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: &str) {
    // `try_with`: during thread teardown the slot may be gone; the status
    // code still tells what happened.
    let _ = LAST_ERROR.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            m.clear();
            m.push_str(message);
        }
    });
}

/// Keeps `failure`'s message as the calling thread's last error.
pub(crate) fn record_failure(failure: &Failure) {
    set_last_error(&failure.message);
}

/// The calling thread's last error message.
pub(crate) fn last_error() -> String {
    LAST_ERROR
        .try_with(|m| m.try_borrow().map(|m| m.clone()).unwrap_or_default())
        .unwrap_or_default()
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// The panic boundary: runs `f`, and if it panics, keeps the panic's
/// message as the last error and returns `on_panic`. Every exported
/// function runs its body through this function (directly or through
/// [`call`]), so no panic unwinds into C.
pub(crate) fn boundary<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(payload) => {
            set_last_error(&format!(
                "flatmerge panicked (a bug; please report it): {}",
                panic_message(payload.as_ref())
            ));
            on_panic
        }
    }
}

/// [`boundary`] for the functions that return a status: the status of
/// `f`'s outcome, whose message becomes the thread's last error (empty on
/// success).
pub(crate) fn call(f: impl FnOnce() -> Outcome) -> flatmerge_status {
    boundary(flatmerge_status::Panic, || match f() {
        Ok(()) => {
            set_last_error("");
            flatmerge_status::Ok
        }
        Err(failure) => {
            record_failure(&failure);
            failure.status
        }
    })
}

/// Copies `message` and a NUL into `buf` (capacity `len`), truncated at a
/// character boundary when it does not fit; returns the size a whole copy
/// needs, NUL included. NULL `buf` or zero `len` copies nothing.
///
/// # Safety
/// A non-NULL `buf` must be valid for writes of `len` bytes.
pub(crate) unsafe fn copy_out(message: &str, buf: *mut c_char, len: usize) -> usize {
    let needed = message.len() + 1;
    if !buf.is_null() && len > 0 {
        let mut n = message.len().min(len - 1);
        while !message.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the caller gives `len` writable bytes and `n < len`.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    needed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_stable() {
        let numbers: Vec<u32> = ALL.iter().map(|s| *s as u32).collect();
        assert_eq!(
            numbers,
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 100, 101, 102, 103, 104]
        );
        for s in ALL {
            assert_eq!(flatmerge_status::from_code(s as u32), Some(s));
        }
        assert_eq!(flatmerge_status::from_code(14), None);
    }

    #[test]
    fn every_error_kind_has_its_own_code() {
        let kinds = ErrorKind::ALL;
        let codes: Vec<u32> = kinds
            .iter()
            .map(|&k| flatmerge_status::of_kind(k) as u32)
            .collect();
        assert_eq!(codes, (1..=11).collect::<Vec<u32>>());
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = call(|| panic!("boom {}", 42));
        assert_eq!(status, flatmerge_status::Panic);
        assert!(last_error().contains("boom 42"), "{}", last_error());
        assert_eq!(boundary(7usize, || panic!("static")), 7);
        assert!(last_error().contains("static"), "{}", last_error());
        assert_eq!(call(|| Ok(())), flatmerge_status::Ok);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn copy_out_truncates_at_a_character_boundary() {
        let mut buf = [0x55 as c_char; 8];
        let needed = unsafe { copy_out("héllo wörld", buf.as_mut_ptr(), buf.len()) };
        assert_eq!(needed, "héllo wörld".len() + 1);
        let copied = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(copied.to_str().unwrap(), "héllo ");
        // Splitting `é` is avoided: 2 bytes fit, `h` and half an `é`.
        let needed = unsafe { copy_out("héllo", buf.as_mut_ptr(), 3) };
        assert_eq!(needed, 7);
        let copied = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(copied.to_str().unwrap(), "h");
        assert_eq!(unsafe { copy_out("x", std::ptr::null_mut(), 0) }, 2);
    }
}
