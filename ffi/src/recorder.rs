//! The activation statistics recorder (SPEC §4) behind an opaque handle.
//!
//! Handles are checked against a registry of live handles (their
//! addresses) before they are touched, so a freed or foreign pointer is
//! reported as `FLATMERGE_STATUS_WRONG_HANDLE` without being dereferenced.
//! The registry lock is held only to look a handle up and take a reference
//! to its recorder: pushes from many threads do not serialise on it, and a
//! handle freed while another thread still pushes stays alive until that
//! push returns.

use crate::args::{non_empty, product, string, Buffer};
use crate::status::{boundary, call, flatmerge_status, record_failure, Failure, Outcome};
use engine::recorder::{MissingRows, Recorder, RecorderOptions};
use std::collections::HashSet;
use std::ffi::c_char;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a recorder writes in an example's row of a layer the example never
/// reached (`missing_rows` of `flatmerge_recorder_new`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum flatmerge_missing_rows {
    /// A row of zeros ("no activation"): a vision layer never sees a
    /// text-only example.
    Zero = 0,
    /// Refuse to save (`FLATMERGE_STATUS_INVALID_INPUT`).
    Error = 1,
}

/// An activation statistics recorder: an opaque handle made by
/// `flatmerge_recorder_new`, owned by the caller and released with
/// `flatmerge_recorder_free`.
#[allow(non_camel_case_types)]
pub struct flatmerge_recorder {
    recorder: Arc<Recorder>,
}

/// Addresses of the live handles.
static LIVE: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<usize>>> {
    // A panic while the lock is held leaves the set consistent (insert and
    // remove are single calls), so a poisoned lock is still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The recorder of a live handle.
fn recorder_of(handle: *const flatmerge_recorder) -> Outcome<Arc<Recorder>> {
    if handle.is_null() {
        return Err(Failure::null("recorder"));
    }
    let live = live();
    if !live
        .as_ref()
        .is_some_and(|set| set.contains(&(handle as usize)))
    {
        return Err(Failure::new(
            flatmerge_status::WrongHandle,
            format!(
                "`recorder` ({handle:p}) is not a live flatmerge_recorder: freed, or never made by flatmerge_recorder_new"
            ),
        ));
    }
    // SAFETY: registered handles are live boxes, and a handle leaves the
    // registry (under this lock) before it is freed.
    Ok(Arc::clone(unsafe { &(*handle).recorder }))
}

/// Makes a recorder for one model and probe set, and stores the new handle
/// in `*recorder_out` (only on success).
///
/// `model` and `probe` are free-form descriptions written to the file's
/// metadata (borrowed NUL-terminated UTF-8; may be empty). With
/// `max_examples = M > 0` the recorder keeps the per-example mean rows
/// `L.x_rows` / `L.y_rows` and `probe.modality` for example ids below `M`
/// (memory: about `16 × (in + out)` bytes per layer and kept example);
/// with 0 it keeps the means only. `missing_rows` is a
/// `flatmerge_missing_rows`. The caller owns the handle and must release
/// it with `flatmerge_recorder_free`. Thread-safe.
///
/// # Safety
/// `model` and `probe` must be NULL or NUL-terminated strings;
/// `recorder_out` must be NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_recorder_new(
    model: *const c_char,
    probe: *const c_char,
    max_examples: usize,
    missing_rows: u32,
    recorder_out: *mut *mut flatmerge_recorder,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (model, probe) = unsafe { (string(model, "model")?, string(probe, "probe")?) };
        let out = Buffer::output(recorder_out, 1, "recorder_out")?;
        let missing_rows = match missing_rows {
            x if x == flatmerge_missing_rows::Zero as u32 => MissingRows::Zero,
            x if x == flatmerge_missing_rows::Error as u32 => MissingRows::Error,
            other => {
                return Err(Failure::invalid(format!(
                    "`missing_rows` is {other}, not a flatmerge_missing_rows (0 or 1)"
                )))
            }
        };
        let handle = Box::into_raw(Box::new(flatmerge_recorder {
            recorder: Arc::new(Recorder::new(RecorderOptions {
                max_examples,
                model: model.to_string(),
                probe: probe.to_string(),
                missing_rows,
                ..RecorderOptions::default()
            })),
        }));
        live()
            .get_or_insert_with(HashSet::new)
            .insert(handle as usize);
        // SAFETY: checked non-NULL and aligned; validity by the caller's contract.
        unsafe { out.slice_mut()[0] = handle };
        Ok(())
    })
}

/// The checks shared by both pushes: the handle, the layer name and the
/// element counts `rows × in_width` and `rows × out_width`.
///
/// # Safety
/// `layer` must be NULL or a NUL-terminated string.
unsafe fn push_args<'a>(
    recorder: *const flatmerge_recorder,
    layer: *const c_char,
    rows: usize,
    in_width: usize,
    out_width: usize,
) -> Outcome<(Arc<Recorder>, &'a str, usize, usize)> {
    let recorder = recorder_of(recorder)?;
    // SAFETY: forwarded.
    let layer = unsafe { non_empty(layer, "layer") }?;
    for (value, name) in [
        (rows, "rows"),
        (in_width, "in_width"),
        (out_width, "out_width"),
    ] {
        if value == 0 {
            return Err(Failure::invalid(format!("`{name}` is 0")));
        }
    }
    let x_len = product(rows, in_width, "rows × in_width")?;
    let y_len = product(rows, out_width, "rows × out_width")?;
    Ok((recorder, layer, x_len, y_len))
}

/// Adds a batch of `rows` tokens of probe example `example_id` through
/// layer `layer` (a weight's name without `.weight`): `x` holds the
/// layer's inputs, row-major `rows × in_width` floats, and `y` its outputs
/// before any nonlinearity, `rows × out_width` floats. `modality` is the
/// example's modality (0 text, 1 vision, 2 audio, …); examples are
/// numbered 0, 1, 2, … without gaps.
///
/// The first batch of a layer sets its widths; a later batch with other
/// widths, a NaN, infinite or too large value (beyond ±2^60), or a
/// modality that differs from an earlier push of the same example is
/// `FLATMERGE_STATUS_INVALID_INPUT`, and adds nothing. Means are summed
/// exactly, so the saved file does not depend on the order of pushes.
///
/// All arguments are borrowed for the call. Thread-safe: any number of
/// threads may push to (and save) the same recorder at once.
///
/// # Safety
/// `recorder` must be NULL or a pointer (live or not); `layer` NULL or a
/// NUL-terminated string; `x` and `y` NULL or valid for their lengths.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_recorder_push_f32(
    recorder: *const flatmerge_recorder,
    layer: *const c_char,
    x: *const f32,
    y: *const f32,
    rows: usize,
    in_width: usize,
    out_width: usize,
    example_id: u64,
    modality: u8,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (recorder, layer, x_len, y_len) =
            unsafe { push_args(recorder, layer, rows, in_width, out_width) }?;
        let x = Buffer::input(x, x_len, "x")?;
        let y = Buffer::input(y, y_len, "y")?;
        // SAFETY: checked; validity by the caller's contract.
        let (x, y) = unsafe { (x.slice(), y.slice()) };
        recorder.push_f32(layer, rows, x, y, example_id, modality)?;
        Ok(())
    })
}

/// `flatmerge_recorder_push_f32` for bfloat16 activations, given as their
/// 16-bit patterns (`uint16_t`, the upper half of an IEEE f32; e.g. a
/// PyTorch `bfloat16` tensor's storage). Same checks, same semantics, same
/// thread-safety.
///
/// # Safety
/// As `flatmerge_recorder_push_f32`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_recorder_push_bf16(
    recorder: *const flatmerge_recorder,
    layer: *const c_char,
    x: *const u16,
    y: *const u16,
    rows: usize,
    in_width: usize,
    out_width: usize,
    example_id: u64,
    modality: u8,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (recorder, layer, x_len, y_len) =
            unsafe { push_args(recorder, layer, rows, in_width, out_width) }?;
        let x = Buffer::input(x, x_len, "x")?;
        let y = Buffer::input(y, y_len, "y")?;
        // SAFETY: checked; validity by the caller's contract.
        let (x, y) = unsafe { (x.slice(), y.slice()) };
        recorder.push_bf16(layer, rows, x, y, example_id, modality)?;
        Ok(())
    })
}

/// `flatmerge_recorder_push_f32` for IEEE half-precision (float16)
/// activations, given as their 16-bit patterns (`uint16_t`; e.g. a PyTorch
/// `float16` tensor's storage). Same checks, same semantics, same
/// thread-safety.
///
/// # Safety
/// As `flatmerge_recorder_push_f32`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_recorder_push_f16(
    recorder: *const flatmerge_recorder,
    layer: *const c_char,
    x: *const u16,
    y: *const u16,
    rows: usize,
    in_width: usize,
    out_width: usize,
    example_id: u64,
    modality: u8,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (recorder, layer, x_len, y_len) =
            unsafe { push_args(recorder, layer, rows, in_width, out_width) }?;
        let x = Buffer::input(x, x_len, "x")?;
        let y = Buffer::input(y, y_len, "y")?;
        // SAFETY: checked; validity by the caller's contract.
        let (x, y) = unsafe { (x.slice(), y.slice()) };
        recorder.push_f16(layer, rows, x, y, example_id, modality)?;
        Ok(())
    })
}

/// Writes the statistics recorded so far to the file `path` (SPEC §4,
/// `*.stats.safetensors`), atomically: a temporary file beside it, renamed
/// when complete. The recorder keeps recording; saving again later writes
/// the statistics then.
///
/// `path` is a borrowed NUL-terminated UTF-8 path. Errors: an example id
/// below the row count never pushed, a missing row with
/// `FLATMERGE_MISSING_ROWS_ERROR` (`FLATMERGE_STATUS_INVALID_INPUT`), I/O
/// (`FLATMERGE_STATUS_IO`). Thread-safe, also while other threads push
/// (the file then holds some consistent subset of the concurrent pushes).
///
/// # Safety
/// `recorder` must be NULL or a pointer (live or not); `path` NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_recorder_save(
    recorder: *const flatmerge_recorder,
    path: *const c_char,
) -> flatmerge_status {
    call(|| {
        let recorder = recorder_of(recorder)?;
        // SAFETY: the caller's contract.
        let path = unsafe { non_empty(path, "path") }?;
        recorder.save(Path::new(path))?;
        Ok(())
    })
}

/// Releases a recorder made by `flatmerge_recorder_new`. NULL is fine
/// (nothing happens); a pointer that is not a live recorder handle (freed
/// already, or foreign) is detected and left alone, and the calling
/// thread's last error says so — best effort: a new handle may reuse the
/// address of a freed one. It sets the last error only then: a successful
/// free leaves the last error as it was. After this call the handle must
/// not be used; pushes still running on other threads finish first (the
/// recorder's memory is released when the last of them returns). Unsaved
/// statistics are lost. Thread-safe.
///
/// # Safety
/// `recorder` must be NULL or a pointer (live or not).
#[no_mangle]
pub unsafe extern "C" fn flatmerge_recorder_free(recorder: *mut flatmerge_recorder) {
    boundary((), || {
        if recorder.is_null() {
            return;
        }
        let removed = live()
            .as_mut()
            .is_some_and(|set| set.remove(&(recorder as usize)));
        if !removed {
            record_failure(&Failure::new(
                flatmerge_status::WrongHandle,
                format!(
                    "flatmerge_recorder_free: {recorder:p} is not a live flatmerge_recorder (freed twice?); left alone"
                ),
            ));
            return;
        }
        // SAFETY: it was registered, so it is a box from `flatmerge_recorder_new`,
        // and it left the registry above, so no other call can reach it now.
        drop(unsafe { Box::from_raw(recorder) });
    })
}
