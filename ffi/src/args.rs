//! Checked conversions of C arguments: strings, buffers, options. Every
//! check happens before the first output is written, so that a failed call
//! leaves its outputs untouched.

use crate::status::{flatmerge_status, Failure, Outcome};
use std::ffi::{c_char, CStr};
use std::mem::{align_of, size_of};

/// A NUL-terminated UTF-8 string argument that must not be NULL.
///
/// # Safety
/// A non-NULL `ptr` must point to a NUL-terminated string that stays
/// valid and unchanged for `'a`.
pub(crate) unsafe fn string<'a>(ptr: *const c_char, name: &str) -> Outcome<&'a str> {
    if ptr.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        Failure::new(
            flatmerge_status::InvalidUtf8,
            format!(
                "`{name}` is not valid UTF-8 (invalid byte at offset {}): {}",
                e.valid_up_to(),
                String::from_utf8_lossy(bytes)
            ),
        )
    })
}

/// A string argument that must not be empty either (paths, names).
///
/// # Safety
/// As [`string`].
pub(crate) unsafe fn non_empty<'a>(ptr: *const c_char, name: &str) -> Outcome<&'a str> {
    // SAFETY: forwarded.
    let s = unsafe { string(ptr, name) }?;
    if s.is_empty() {
        return Err(Failure::invalid(format!("`{name}` is an empty string")));
    }
    Ok(s)
}

/// A checked buffer argument: `len` elements of `T` at `ptr`, not NULL, not
/// empty, aligned, and whose byte range fits the address space.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffer<T> {
    ptr: *mut T,
    len: usize,
    name: &'static str,
}

impl<T> Buffer<T> {
    fn check(ptr: *mut T, len: usize, name: &'static str) -> Outcome<Self> {
        if ptr.is_null() {
            return Err(Failure::null(name));
        }
        if len == 0 {
            return Err(Failure::invalid(format!(
                "`{name}` has length 0; every buffer holds at least one element"
            )));
        }
        if (ptr as usize) % align_of::<T>() != 0 {
            return Err(Failure::invalid(format!(
                "`{name}` is not aligned to {} bytes",
                align_of::<T>()
            )));
        }
        let fits = len
            .checked_mul(size_of::<T>())
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .and_then(|bytes| (ptr as usize).checked_add(bytes));
        if fits.is_none() {
            return Err(Failure::invalid(format!(
                "`{name}`: a length of {len} elements overflows the address space"
            )));
        }
        Ok(Buffer { ptr, len, name })
    }

    /// An input buffer.
    pub fn input(ptr: *const T, len: usize, name: &'static str) -> Outcome<Self> {
        Buffer::check(ptr.cast_mut(), len, name)
    }

    /// An output buffer.
    pub fn output(ptr: *mut T, len: usize, name: &'static str) -> Outcome<Self> {
        Buffer::check(ptr, len, name)
    }

    /// An optional input: `(NULL, 0)` is absent; NULL with a length, or a
    /// pointer with length 0, is an error.
    pub fn optional_input(ptr: *const T, len: usize, name: &'static str) -> Outcome<Option<Self>> {
        if ptr.is_null() && len == 0 {
            return Ok(None);
        }
        Buffer::input(ptr, len, name).map(Some)
    }

    /// An optional output, as [`Buffer::optional_input`].
    pub fn optional_output(ptr: *mut T, len: usize, name: &'static str) -> Outcome<Option<Self>> {
        if ptr.is_null() && len == 0 {
            return Ok(None);
        }
        Buffer::output(ptr, len, name).map(Some)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Fails unless the buffer holds `expected` elements; `what` says where
    /// the number comes from.
    pub fn expect_len(&self, expected: usize, what: &str) -> Outcome {
        if self.len != expected {
            return Err(Failure::invalid(format!(
                "`{}` has length {}, expected {expected} ({what})",
                self.name, self.len
            )));
        }
        Ok(())
    }

    fn range(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.len * size_of::<T>())
    }

    /// The elements, shared.
    ///
    /// # Safety
    /// The buffer must be valid for reads of `len` elements and not written
    /// by anyone for `'a`.
    pub unsafe fn slice<'a>(self) -> &'a [T] {
        // SAFETY: checked non-NULL, aligned and in range; validity by the caller.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The elements, exclusive.
    ///
    /// # Safety
    /// The buffer must be valid for writes of `len` elements, used by no one
    /// else for `'a`, and [`disjoint`] must have accepted it against every
    /// other buffer of the call.
    pub unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// The byte range and name of a buffer, for [`disjoint`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    start: usize,
    end: usize,
    name: &'static str,
}

impl<T> From<&Buffer<T>> for Region {
    fn from(b: &Buffer<T>) -> Region {
        let (start, end) = b.range();
        Region {
            start,
            end,
            name: b.name,
        }
    }
}

/// Fails if an output overlaps another output or any input (Rust's
/// aliasing rules forbid it, and the kernels read inputs while writing).
pub(crate) fn disjoint(outputs: &[Region], inputs: &[Region]) -> Outcome {
    for (i, out) in outputs.iter().enumerate() {
        for other in outputs[i + 1..].iter().chain(inputs) {
            if out.start < other.end && other.start < out.end {
                return Err(Failure::invalid(format!(
                    "`{}` overlaps `{}`; outputs must not share memory with any other buffer",
                    out.name, other.name
                )));
            }
        }
    }
    Ok(())
}

/// `a × b`, or an error naming the product when it overflows.
pub(crate) fn product(a: usize, b: usize, what: &str) -> Outcome<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Failure::invalid(format!("{what}: {a} × {b} overflows")))
}

/// A finite f32 parameter.
pub(crate) fn finite(value: f32, name: &str) -> Outcome<f32> {
    if !value.is_finite() {
        return Err(Failure::invalid(format!(
            "`{name}` is {value}; expected a finite number"
        )));
    }
    Ok(value)
}

/// A finite, strictly positive f32 parameter (the `ε` of SPEC §1).
pub(crate) fn positive(value: f32, name: &str) -> Outcome<f32> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Failure::invalid(format!(
            "`{name}` is {value}; expected a finite number > 0"
        )));
    }
    Ok(value)
}

/// A density `k ∈ (0, 1]` (SPEC §1.2).
pub(crate) fn density(value: f64, name: &str) -> Outcome<f64> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(Failure::invalid(format!(
            "`{name}` is {value}; expected a density in (0, 1]"
        )));
    }
    Ok(value)
}

/// A threshold: any number but NaN.
pub(crate) fn threshold(value: f32, name: &str) -> Outcome<f32> {
    if value.is_nan() {
        return Err(Failure::invalid(format!("`{name}` is NaN")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_checked() {
        let data = [1.0f32; 4];
        let p = data.as_ptr();
        assert!(Buffer::input(p, 4, "x").is_ok());
        let e = Buffer::<f32>::input(std::ptr::null(), 4, "x").unwrap_err();
        assert_eq!(e.status, flatmerge_status::NullPointer);
        let e = Buffer::input(p, 0, "x").unwrap_err();
        assert_eq!(e.status, flatmerge_status::InvalidArgument);
        let e = Buffer::input(p, usize::MAX / 2, "x").unwrap_err();
        assert!(e.message.contains("overflows"), "{}", e.message);
        let misaligned = unsafe { p.cast::<u8>().add(1).cast::<f32>() };
        let e = Buffer::input(misaligned, 1, "x").unwrap_err();
        assert!(e.message.contains("aligned"), "{}", e.message);
        assert!(Buffer::<f32>::optional_input(std::ptr::null(), 0, "x")
            .unwrap()
            .is_none());
        assert!(Buffer::<f32>::optional_input(std::ptr::null(), 3, "x").is_err());
        assert!(Buffer::optional_input(p, 0, "x").is_err());
    }

    #[test]
    fn overlapping_outputs_are_refused() {
        let mut data = [0.0f32; 8];
        let base = data.as_mut_ptr();
        let a = Buffer::output(base, 4, "a").unwrap();
        let b = Buffer::output(unsafe { base.add(4) }, 4, "b").unwrap();
        let c = Buffer::input(unsafe { base.add(3) }, 2, "c").unwrap();
        assert!(disjoint(&[(&a).into(), (&b).into()], &[]).is_ok());
        let e = disjoint(&[(&a).into()], &[(&c).into()]).unwrap_err();
        assert!(e.message.contains("`a` overlaps `c`"), "{}", e.message);
        // Inputs may share memory with each other.
        assert!(disjoint(&[], &[(&a).into(), (&c).into()]).is_ok());
    }
}
