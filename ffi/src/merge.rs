//! Merges from a config file or from YAML text, with options, a progress
//! callback and cancellation.

use crate::args::{non_empty, string};
use crate::status::{call, flatmerge_status, Failure, Outcome};
use engine::config::MergeConfig;
use engine::dtype::Dtype;
use engine::engine::{MergeOptions, PreparedMerge, Progress};
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Output dtypes, for the `out_dtype` field of `flatmerge_merge_options`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum flatmerge_dtype {
    /// The config's `out_dtype` (or `dtype`); without one, each tensor
    /// keeps the receiver's dtype.
    Default = 0,
    /// IEEE single precision.
    F32 = 1,
    /// IEEE half precision.
    F16 = 2,
    /// bfloat16.
    Bf16 = 3,
}

/// Where a merge is: passed to the progress callback after each tensor is
/// written. Valid only during the callback.
#[repr(C)]
#[derive(Debug)]
#[allow(non_camel_case_types)]
pub struct flatmerge_progress {
    /// Tensors written so far.
    pub tensors_done: usize,
    /// Tensors in all.
    pub tensors_total: usize,
    /// Output bytes written so far.
    pub bytes_done: u64,
    /// Output bytes in all.
    pub bytes_total: u64,
    /// The tensor just written: a NUL-terminated UTF-8 string, valid only
    /// during the callback.
    pub tensor: *const c_char,
}

/// A progress callback: called after each tensor is written with where the
/// merge is and the `user_data` of the options. Return 0 to go on, any
/// other value to cancel the merge (it then returns
/// `FLATMERGE_STATUS_CANCELLED` and leaves nothing behind; after the last
/// tensor there is nothing left to cancel, and the merge completes). It is called
/// from one of the merge's worker threads, never concurrently with itself,
/// and only before the merge function returns. It must not unwind (no C++
/// exception, no `longjmp`) through flatmerge.
#[allow(non_camel_case_types)]
pub type flatmerge_progress_fn = Option<
    unsafe extern "C" fn(progress: *const flatmerge_progress, user_data: *mut c_void) -> i32,
>;

/// How to run a merge. All-zero (`flatmerge_merge_options o = {0};` in C,
/// `flatmerge_merge_options o{};` in C++) is the default for every field,
/// and a NULL options pointer means the same.
#[repr(C)]
#[derive(Debug)]
#[allow(non_camel_case_types)]
pub struct flatmerge_merge_options {
    /// Largest output shard in bytes of tensor data; 0 writes one file.
    pub max_shard_bytes: u64,
    /// Worker threads; 0 uses every core. The output is the same for any count.
    pub threads: u32,
    /// A `flatmerge_dtype`: the output dtype, overriding the config's.
    pub out_dtype: u32,
    /// Replace an existing output directory (only once the merge succeeded).
    pub force: bool,
    /// The seed of DARE's and DELLA's random masks; NULL keeps the default (0).
    pub random_seed: *const u64,
    /// Called after each tensor is written; may be NULL.
    pub progress: flatmerge_progress_fn,
    /// Passed to `progress` unchanged; flatmerge never reads it.
    pub user_data: *mut c_void,
    /// May be NULL. Set `*cancel` to non-zero, from any thread, to stop the
    /// merge before its next tensor; the merge then returns
    /// `FLATMERGE_STATUS_CANCELLED` and leaves nothing behind (once the last
    /// tensor is written, the merge completes). flatmerge
    /// reads it with atomic loads: write it with an atomic store
    /// (`__atomic_store_n(cancel, 1, __ATOMIC_RELAXED)`, C++20
    /// `std::atomic_ref<int32_t>`). It must stay valid until the merge returns.
    pub cancel: *const i32,
}

/// The options with their pointers checked and their numbers converted.
struct Resolved {
    max_shard_bytes: Option<u64>,
    threads: Option<usize>,
    out_dtype: Option<Dtype>,
    force: bool,
    seed: Option<u64>,
    callback: Callback,
}

/// The C callback, its data and the cancel flag.
#[derive(Clone, Copy)]
struct Callback {
    progress: flatmerge_progress_fn,
    user_data: *mut c_void,
    cancel: *const i32,
}

// SAFETY: the engine calls progress from one worker thread at a time while
// the merge call blocks; the options document that the callback and its
// `user_data` are used from a worker thread, and that `cancel` is read
// atomically and stays valid until the merge returns.
unsafe impl Sync for Callback {}
// SAFETY: as above.
unsafe impl Send for Callback {}

impl Callback {
    /// Whether the caller set the cancel flag.
    fn cancel_requested(&self) -> bool {
        if self.cancel.is_null() {
            return false;
        }
        // SAFETY: non-NULL, checked aligned in `resolve`, valid until the
        // merge returns, and written only atomically (documented).
        unsafe { AtomicI32::from_ptr(self.cancel.cast_mut()) }.load(Ordering::Relaxed) != 0
    }

    /// Calls the C callback; whether it asked to cancel.
    fn report(&self, p: &Progress<'_>) -> bool {
        let Some(f) = self.progress else {
            return false;
        };
        // A NUL inside a tensor name cannot reach C as it is.
        let name = CString::new(p.tensor.replace('\0', "\u{FFFD}")).unwrap_or_default();
        let progress = flatmerge_progress {
            tensors_done: p.tensors_done,
            tensors_total: p.tensors_total,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            tensor: name.as_ptr(),
        };
        // SAFETY: a C function given by the caller, with a pointer valid for
        // the call and the caller's own `user_data`.
        unsafe { f(&progress, self.user_data) != 0 }
    }
}

/// Checks and converts the options (NULL: defaults).
///
/// # Safety
/// A non-NULL `options` must point to a valid `flatmerge_merge_options`,
/// and its `random_seed` to a valid `uint64_t` when non-NULL.
unsafe fn resolve(options: *const flatmerge_merge_options) -> Outcome<Resolved> {
    // SAFETY: the caller's contract.
    let Some(o) = (unsafe { options.as_ref() }) else {
        return Ok(Resolved {
            max_shard_bytes: None,
            threads: None,
            out_dtype: None,
            force: false,
            seed: None,
            callback: Callback {
                progress: None,
                user_data: std::ptr::null_mut(),
                cancel: std::ptr::null(),
            },
        });
    };
    let out_dtype = match o.out_dtype {
        x if x == flatmerge_dtype::Default as u32 => None,
        x if x == flatmerge_dtype::F32 as u32 => Some(Dtype::F32),
        x if x == flatmerge_dtype::F16 as u32 => Some(Dtype::F16),
        x if x == flatmerge_dtype::Bf16 as u32 => Some(Dtype::BF16),
        other => {
            return Err(Failure::invalid(format!(
                "`options.out_dtype` is {other}, not a flatmerge_dtype (0 to 3)"
            )))
        }
    };
    if !o.cancel.is_null() && (o.cancel as usize) % std::mem::align_of::<AtomicI32>() != 0 {
        return Err(Failure::invalid(
            "`options.cancel` is not aligned to 4 bytes",
        ));
    }
    if !o.random_seed.is_null() && (o.random_seed as usize) % std::mem::align_of::<u64>() != 0 {
        return Err(Failure::invalid(
            "`options.random_seed` is not aligned to 8 bytes",
        ));
    }
    Ok(Resolved {
        max_shard_bytes: (o.max_shard_bytes > 0).then_some(o.max_shard_bytes),
        threads: (o.threads > 0).then_some(o.threads as usize),
        out_dtype,
        force: o.force,
        // SAFETY: non-NULL and aligned; valid by the caller's contract.
        seed: (!o.random_seed.is_null()).then(|| unsafe { *o.random_seed }),
        callback: Callback {
            progress: o.progress,
            user_data: o.user_data,
            cancel: o.cancel,
        },
    })
}

/// Plans and runs the merge of `config` into `out_dir`.
fn run(mut config: MergeConfig, out_dir: &str, options: Resolved) -> Outcome {
    if let Some(dtype) = options.out_dtype {
        config.out_dtype = Some(dtype);
    }
    if let Some(seed) = options.seed {
        config.seed = seed;
    }
    let prepared = PreparedMerge::new(config)?;
    let callback = options.callback;
    let cancelled = AtomicBool::new(callback.cancel_requested());
    let on_progress = |p: &Progress<'_>| {
        if callback.report(p) || callback.cancel_requested() {
            cancelled.store(true, Ordering::Relaxed);
        }
    };
    prepared.run(&MergeOptions {
        out_dir: PathBuf::from(out_dir),
        max_shard_bytes: options.max_shard_bytes,
        threads: options.threads,
        force: options.force,
        progress: Some(&on_progress),
        cancel: Some(&cancelled),
        ..MergeOptions::default()
    })?;
    Ok(())
}

/// Merges the models of the config file at `config_path` into the
/// directory `out_dir`. Relative paths in the config are resolved against
/// the config file's directory.
///
/// `config_path` and `out_dir` are borrowed NUL-terminated UTF-8 paths;
/// `options` is borrowed and may be NULL (defaults). The output directory
/// is written under a temporary name and renamed into place only when
/// complete: on any error nothing is left behind. Blocking; thread-safe
/// (concurrent merges into different directories are independent).
///
/// # Safety
/// Every non-NULL pointer must be valid as documented above.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_merge_file(
    config_path: *const c_char,
    out_dir: *const c_char,
    options: *const flatmerge_merge_options,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (path, out, options) = unsafe {
            (
                non_empty(config_path, "config_path")?,
                non_empty(out_dir, "out_dir")?,
                resolve(options)?,
            )
        };
        run(MergeConfig::from_file(Path::new(path))?, out, options)
    })
}

/// Merges the models of the YAML config text `yaml` into the directory
/// `out_dir`. Relative paths in the config are resolved against
/// `base_dir`, or against the current directory when `base_dir` is NULL.
///
/// `yaml`, `base_dir` and `out_dir` are borrowed NUL-terminated UTF-8
/// strings; `options` is borrowed and may be NULL (defaults). Nothing is
/// left behind on error. Blocking; thread-safe.
///
/// # Safety
/// Every non-NULL pointer must be valid as documented above.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_merge_yaml(
    yaml: *const c_char,
    base_dir: *const c_char,
    out_dir: *const c_char,
    options: *const flatmerge_merge_options,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let (text, out, options) = unsafe {
            (
                string(yaml, "yaml")?,
                non_empty(out_dir, "out_dir")?,
                resolve(options)?,
            )
        };
        let base = match base_dir.is_null() {
            true => ".",
            // SAFETY: the caller's contract.
            false => unsafe { non_empty(base_dir, "base_dir") }?,
        };
        run(
            MergeConfig::from_yaml(text, Path::new(base), None)?,
            out,
            options,
        )
    })
}
