//! The optional CUDA path of the SAFE-M kernels (crate `flatmerge-cuda`).
//! These functions exist in every build, so the header is the same with or
//! without the `cuda` feature: without it, or without a usable device,
//! `flatmerge_cuda_device` says why and `flatmerge_merge_tensor_cuda` runs
//! the CPU reference (and says so in `backend`).

use crate::args::{disjoint, Buffer};
use crate::kernels::{
    checked_merge_tensor, flatmerge_election, flatmerge_mask_counts, flatmerge_tensor_contributor,
};
use crate::status::{call, flatmerge_status, Failure, Outcome};
use flatmerge_cuda::{Accelerator, Backend, CudaOptions, ErrorKind};

/// Where a kernel ran, for the `backend` output of the CUDA kernels.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum flatmerge_backend {
    /// On the CPU (the reference): no usable CUDA device.
    Cpu = 0,
    /// On a CUDA device.
    Cuda = 1,
}

/// Which CUDA device to use and how much of its memory. All zero: device
/// 0, no limit beyond its free memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(non_camel_case_types)]
pub struct flatmerge_cuda_options {
    /// CUDA device ordinal.
    pub device: u32,
    /// Bytes of device memory one call may allocate; 0: the device's free
    /// memory less a reserve. Larger tensors are processed in row chunks.
    pub memory_limit: u64,
}

/// The options, NULL meaning the defaults.
///
/// # Safety
/// A non-NULL `options` must be valid for reads.
unsafe fn options(options: *const flatmerge_cuda_options) -> CudaOptions {
    // SAFETY: the caller's contract; `as_ref` maps NULL to None.
    let o = unsafe { options.as_ref() }.copied().unwrap_or_default();
    CudaOptions {
        device: o.device as usize,
        memory_limit: (o.memory_limit != 0)
            .then(|| usize::try_from(o.memory_limit).unwrap_or(usize::MAX)),
    }
}

fn device_failure(e: flatmerge_cuda::Error) -> Failure {
    let status = match e.kind {
        ErrorKind::TooLarge => flatmerge_status::InvalidArgument,
        _ => flatmerge_status::Device,
    };
    Failure::new(status, e.message)
}

/// Whether the CUDA device of `options` (NULL: the defaults) can run the
/// kernels: `FLATMERGE_STATUS_OK`, or `FLATMERGE_STATUS_NO_DEVICE` with
/// the reason as the last error (built without the `cuda` feature, no
/// driver or NVRTC library, no such device, kernels that did not compile).
/// The first call for a device opens it and compiles the kernels with
/// NVRTC; later calls, here and in the kernels, reuse it. Thread-safe.
///
/// # Safety
/// A non-NULL `options` must be valid for reads.
#[no_mangle]
pub unsafe extern "C" fn flatmerge_cuda_device(
    options: *const flatmerge_cuda_options,
) -> flatmerge_status {
    call(|| {
        // SAFETY: the caller's contract.
        let accelerator = Accelerator::new(&unsafe { self::options(options) });
        match accelerator.backend() {
            Backend::Gpu { .. } => Ok(()),
            Backend::Cpu { reason } => Err(Failure::new(
                flatmerge_status::NoDevice,
                format!("no usable CUDA device: {reason}"),
            )),
        }
    })
}

/// `flatmerge_merge_tensor` on a CUDA device: the same arguments, checks
/// and results, plus `cuda` (NULL: the defaults) and `backend`. Scores,
/// masks, projection coefficients and fusion run on the device, the
/// election threshold on the host; the results are bit-identical to
/// `flatmerge_merge_tensor` (the kernels are compiled without FMA
/// contraction). Without a usable device the CPU runs it instead: the
/// status is still `FLATMERGE_STATUS_OK` and `backend` (NULL allowed)
/// receives `FLATMERGE_BACKEND_CPU`; `flatmerge_cuda_device` says why.
/// A failing CUDA call is `FLATMERGE_STATUS_DEVICE`; a `memory_limit` too
/// small for one row is `FLATMERGE_STATUS_INVALID_ARGUMENT`. Thread-safe.
///
/// # Safety
/// As `flatmerge_merge_tensor`; a non-NULL `cuda` must be valid for reads
/// and a non-NULL `backend` for writes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn flatmerge_merge_tensor_cuda(
    receiver: *const f32,
    receiver_len: usize,
    receiver_y: *const f32,
    receiver_y_len: usize,
    receiver_election: flatmerge_election,
    ancestor: *const f32,
    ancestor_len: usize,
    ancestor_y: *const f32,
    ancestor_y_len: usize,
    x_mean: *const f32,
    x_mean_len: usize,
    contributors: *const flatmerge_tensor_contributor,
    contributors_len: usize,
    is_bias: bool,
    epsilon: f32,
    out: *mut f32,
    out_len: usize,
    counts: *mut flatmerge_mask_counts,
    counts_len: usize,
    cuda: *const flatmerge_cuda_options,
    backend: *mut u32,
) -> flatmerge_status {
    call(|| {
        let backend = match backend.is_null() {
            true => None,
            false => Some(Buffer::output(backend, 1, "backend")?),
        };
        if let (Some(b), false) = (&backend, cuda.is_null()) {
            let cuda = Buffer::input(cuda, 1, "cuda")?;
            disjoint(&[b.into()], &[(&cuda).into()])?;
        }
        // SAFETY: the caller's contract.
        let accelerator = Accelerator::new(&unsafe { options(cuda) });
        let ran_on = match accelerator.is_gpu() {
            true => flatmerge_backend::Cuda,
            false => flatmerge_backend::Cpu,
        };
        // SAFETY: forwarded; the caller's contract.
        unsafe {
            checked_merge_tensor(
                receiver,
                receiver_len,
                receiver_y,
                receiver_y_len,
                receiver_election,
                ancestor,
                ancestor_len,
                ancestor_y,
                ancestor_y_len,
                x_mean,
                x_mean_len,
                contributors,
                contributors_len,
                is_bias,
                epsilon,
                out,
                out_len,
                counts,
                counts_len,
                |t| -> Outcome<_> {
                    accelerator
                        .merge_tensor(
                            t.receiver,
                            t.receiver_y,
                            t.receiver_election,
                            t.ancestor,
                            t.ancestor_y,
                            t.x_mean,
                            t.contributors,
                            t.is_bias,
                            t.epsilon,
                        )
                        .map_err(device_failure)
                },
            )?;
        }
        if let Some(backend) = backend {
            // SAFETY: checked above; written only on success.
            unsafe { backend.slice_mut()[0] = ran_on as u32 };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{flatmerge_merge_tensor, flatmerge_score_form};

    #[test]
    fn the_cuda_variant_gives_the_cpu_result_and_says_where_it_ran() {
        let c = [0.1f32, -0.2, 0.3, 0.0, 0.5, -0.6];
        let a = [0.2f32, -0.1, 0.1, 0.4, 0.5, -0.7];
        let b = [0.3f32, -0.3, 0.5, -0.2, 0.6, -0.5];
        let (ya, yb, yc, x) = (
            [1.0f32, 2.0],
            [0.5f32, -1.0],
            [0.0f32, 0.5],
            [1.0f32, 0.5, -2.0],
        );
        let election = flatmerge_election {
            density: 0.5,
            form: flatmerge_score_form {
                kind: 0,
                param: 1.0,
            },
        };
        let contributor = flatmerge_tensor_contributor {
            weight: b.as_ptr(),
            weight_len: 6,
            y_mean: yb.as_ptr(),
            y_mean_len: 2,
            election,
            lambda_proj: 1.0,
            lambda_ortho: 0.5,
        };
        let mut cpu = [0f32; 6];
        let mut dev = [0f32; 6];
        let mut cpu_counts = [flatmerge_mask_counts::default()];
        let mut dev_counts = [flatmerge_mask_counts::default()];
        let mut backend = 99u32;
        unsafe {
            let status = flatmerge_merge_tensor(
                a.as_ptr(),
                6,
                ya.as_ptr(),
                2,
                election,
                c.as_ptr(),
                6,
                yc.as_ptr(),
                2,
                x.as_ptr(),
                3,
                &contributor,
                1,
                false,
                1e-8,
                cpu.as_mut_ptr(),
                6,
                cpu_counts.as_mut_ptr(),
                1,
            );
            assert_eq!(status, flatmerge_status::Ok);
            let status = flatmerge_merge_tensor_cuda(
                a.as_ptr(),
                6,
                ya.as_ptr(),
                2,
                election,
                c.as_ptr(),
                6,
                yc.as_ptr(),
                2,
                x.as_ptr(),
                3,
                &contributor,
                1,
                false,
                1e-8,
                dev.as_mut_ptr(),
                6,
                dev_counts.as_mut_ptr(),
                1,
                std::ptr::null(),
                &mut backend,
            );
            assert_eq!(status, flatmerge_status::Ok);
        }
        assert_eq!(cpu.map(f32::to_bits), dev.map(f32::to_bits));
        assert_eq!(cpu_counts, dev_counts);
        let device = unsafe { flatmerge_cuda_device(std::ptr::null()) };
        match device {
            flatmerge_status::Ok => assert_eq!(backend, flatmerge_backend::Cuda as u32),
            status => {
                assert_eq!(status, flatmerge_status::NoDevice);
                assert_eq!(backend, flatmerge_backend::Cpu as u32);
                let message = crate::status::last_error();
                assert!(message.starts_with("no usable CUDA device: "), "{message}");
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP: CUDA comparison of flatmerge_merge_tensor_cuda: {message}"
                );
            }
        }
    }

    #[test]
    fn misuse_is_checked_before_anything_runs() {
        let mut out = [7f32; 2];
        let mut backend = 99u32;
        let election = flatmerge_election {
            density: 0.5,
            form: flatmerge_score_form {
                kind: 0,
                param: 1.0,
            },
        };
        let status = unsafe {
            flatmerge_merge_tensor_cuda(
                std::ptr::null(),
                2,
                out.as_ptr(),
                2,
                election,
                out.as_ptr(),
                2,
                out.as_ptr(),
                2,
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                true,
                1e-8,
                out.as_mut_ptr(),
                2,
                std::ptr::null_mut(),
                0,
                std::ptr::null(),
                &mut backend,
            )
        };
        assert_eq!(status, flatmerge_status::NullPointer);
        assert_eq!(backend, 99, "outputs written only on success");
        assert_eq!(out, [7.0; 2]);
    }
}
