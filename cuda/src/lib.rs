//! Optional NVIDIA GPU path for flatmerge's element-wise SAFE-M stages
//! (scores, election counts, conflict-free masks, projection coefficients,
//! fusion: SPEC §1.2–1.3) and FAM's similarity matrix (SPEC §2.3).
//!
//! The CPU functions of `flatmerge` stay the reference. An [`Accelerator`]
//! offers the same operations with the same signatures; it runs them on a
//! device when the crate is built with the `cuda` feature and a device is
//! found at run time, and otherwise calls the CPU function itself. The
//! device kernels (`kernels.cu`, compiled by NVRTC when a device is first
//! opened) mirror the CPU formulas operation by operation and are compiled
//! without FMA contraction, so scores, masks, counts and fused values are
//! bit-identical to the CPU's; the similarity matrix agrees up to f32
//! summation order (see [`Accelerator::correlation`]).
//!
//! What stays on the host: the election threshold (the exact radix select
//! of `flatmerge::select`, O(n) over scores copied back) and `⟨d, d⟩`.
//!
//! Tensors larger than the device memory a call may use ([`CudaOptions`])
//! are processed in chunks of whole rows ([`chunks`]).
//!
//! Tests: `tests/agreement.rs` compares device and CPU on a GPU (and skips
//! visibly without one); `tests/emulated.rs` runs `kernels.cu` with the
//! CUDA built-ins emulated on the CPU, so the kernels' arithmetic is
//! checked on every machine.
#![deny(missing_docs)]

pub mod chunks;
#[cfg(feature = "cuda")]
mod device;

use flatmerge::safe_m::{self, Contributor, ContributorBlock, Election, ElectionParams};
use flatmerge::safe_m::{MaskCounts, MergedTensor, ScoreForm};
use flatmerge::{fam, select};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A CUDA driver call failed (allocation, copy, launch).
    Driver,
    /// NVRTC could not compile the kernels.
    Compile,
    /// Not even one row (or element) of the call fits in the device memory
    /// the call may use.
    TooLarge,
}

/// A failure of the device path. The CPU path never fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The kind.
    pub kind: ErrorKind,
    /// What failed, for a person.
    pub message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Which device to use and how much of its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaOptions {
    /// CUDA device ordinal (0: the first device).
    pub device: usize,
    /// Bytes of device memory one call may allocate; `None`: the free
    /// memory less a reserve ([`chunks::budget`]). Larger tensors are
    /// processed in chunks.
    pub memory_limit: Option<usize>,
}

/// Where an [`Accelerator`] runs its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// On a CUDA device.
    Gpu {
        /// Its ordinal.
        device: usize,
        /// Its name, as the driver gives it.
        name: String,
    },
    /// On the CPU (the reference), and why not on a device.
    Cpu {
        /// Why no device is used.
        reason: String,
    },
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Gpu { device, name } => write!(f, "CUDA device {device} ({name})"),
            Backend::Cpu { reason } => write!(f, "CPU ({reason})"),
        }
    }
}

/// Whether this build has the device path at all (the `cuda` feature).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// Set by the first fallback of the process, so that it is announced once.
static FALLBACK_ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// Runs SAFE-M's element-wise stages and FAM's similarity matrix on a CUDA
/// device when there is one, else on the CPU. Cheap to create after the
/// first: a device is opened (and the kernels compiled) once per process.
/// Thread-safe: each call uses its own stream.
#[derive(Debug, Clone)]
pub struct Accelerator {
    backend: Backend,
    first_fallback: bool,
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<device::Gpu>>,
    #[cfg(feature = "cuda")]
    memory_limit: Option<usize>,
}

impl Accelerator {
    /// Opens device `options.device`, or falls back to the CPU when this
    /// build has no `cuda` feature, the driver or NVRTC library is missing,
    /// there is no such device, or the kernels do not compile.
    pub fn new(options: &CudaOptions) -> Accelerator {
        #[cfg(feature = "cuda")]
        {
            match device::open(options.device) {
                Ok(gpu) => Accelerator {
                    backend: Backend::Gpu {
                        device: options.device,
                        name: gpu.name().to_string(),
                    },
                    first_fallback: false,
                    gpu: Some(gpu),
                    memory_limit: options.memory_limit,
                },
                Err(reason) => Accelerator::fallback(reason),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = options;
            Accelerator::fallback("flatmerge was built without the `cuda` feature".into())
        }
    }

    /// The CPU reference, whatever the build and the machine.
    pub fn cpu() -> Accelerator {
        Accelerator {
            backend: Backend::Cpu {
                reason: "the CPU path was asked for".into(),
            },
            first_fallback: false,
            #[cfg(feature = "cuda")]
            gpu: None,
            #[cfg(feature = "cuda")]
            memory_limit: None,
        }
    }

    fn fallback(reason: String) -> Accelerator {
        Accelerator {
            backend: Backend::Cpu { reason },
            first_fallback: !FALLBACK_ANNOUNCED.swap(true, Ordering::Relaxed),
            #[cfg(feature = "cuda")]
            gpu: None,
            #[cfg(feature = "cuda")]
            memory_limit: None,
        }
    }

    /// Where the operations run.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether the operations run on a device.
    pub fn is_gpu(&self) -> bool {
        matches!(self.backend, Backend::Gpu { .. })
    }

    /// The message to show a user when this is the process's first
    /// accelerator that fell back to the CPU (`None` otherwise, and for
    /// [`Accelerator::cpu`]): callers print it through their own channel
    /// (the CLI on stderr), so the fallback is announced once, not per
    /// tensor.
    pub fn fallback_notice(&self) -> Option<String> {
        match &self.backend {
            Backend::Cpu { reason } if self.first_fallback => Some(format!(
                "flatmerge: no CUDA device, running on the CPU: {reason}"
            )),
            _ => None,
        }
    }

    /// `safe_m::score_matrix` (SPEC §1.2): scores of a block of rows with
    /// the rank-one pseudo-gradient `u ⊗ v`. Bit-identical on a device.
    ///
    /// # Panics
    /// On the sizes `safe_m::score_matrix` panics on.
    pub fn score_matrix(
        &self,
        weight: &[f32],
        u: &[f32],
        v: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        assert_eq!(weight.len(), u.len() * v.len(), "score_matrix: weight size");
        assert_eq!(out.len(), weight.len(), "score_matrix: output size");
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.score_matrix(self.memory_limit, weight, u, v, form, out);
        }
        safe_m::score_matrix(weight, u, v, form, out);
        Ok(())
    }

    /// `safe_m::score_vector` (SPEC §1.2): scores of a bias. Bit-identical
    /// on a device.
    ///
    /// # Panics
    /// On the sizes `safe_m::score_vector` panics on.
    pub fn score_vector(
        &self,
        bias: &[f32],
        u: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        assert_eq!(bias.len(), u.len(), "score_vector: widths differ");
        assert_eq!(out.len(), bias.len(), "score_vector: output size");
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.score_vector(self.memory_limit, bias, u, form, out);
        }
        safe_m::score_vector(bias, u, form, out);
        Ok(())
    }

    /// How many scores are elected against `threshold`
    /// (`select::is_elected`: `S ≥ t ∧ S > 0`, SPEC §1.2).
    pub fn count_elected(&self, scores: &[f32], threshold: f32) -> Result<u64, Error> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.count_elected(self.memory_limit, scores, threshold);
        }
        Ok(scores
            .iter()
            .filter(|&&s| select::is_elected(s, threshold))
            .count() as u64)
    }

    /// `safe_m::fuse_block` (SPEC §1.2–1.5): the conflict-free masks, the
    /// projection coefficients and the fusion of a block of rows, with the
    /// same arguments (no scratch: the device has its own). Bit-identical on
    /// a device, counts included.
    ///
    /// # Panics
    /// On the sizes `safe_m::fuse_block` panics on.
    #[allow(clippy::too_many_arguments)]
    pub fn fuse_block(
        &self,
        receiver: &[f32],
        ancestor: &[f32],
        receiver_election: Election<'_>,
        contributors: &[ContributorBlock<'_>],
        direction: Option<(&[f32], f64)>,
        epsilon: f32,
        out: &mut [f32],
        counts: &mut [MaskCounts],
    ) -> Result<(), Error> {
        let n = receiver.len();
        assert!(ancestor.len() == n && out.len() == n && receiver_election.scores.len() == n);
        assert_eq!(
            counts.len(),
            contributors.len(),
            "fuse_block: one count per contributor"
        );
        assert!(contributors
            .iter()
            .all(|c| c.weight.len() == n && c.election.scores.len() == n));
        if let Some((d, _)) = direction {
            assert!(
                d.is_empty() || n % d.len() == 0,
                "fuse_block: block is not whole rows"
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.fuse_block(
                self.memory_limit,
                receiver,
                ancestor,
                receiver_election,
                contributors,
                direction,
                epsilon,
                out,
                counts,
            );
        }
        safe_m::fuse_block(
            receiver,
            ancestor,
            receiver_election,
            contributors,
            direction,
            epsilon,
            out,
            &mut Vec::new(),
            counts,
        );
        Ok(())
    }

    /// `safe_m::merge_tensor` (SPEC §1.2–1.5) on one whole tensor: scores on
    /// the device, thresholds on the host (the exact radix select over the
    /// scores copied back), masks and fusion on the device. Bit-identical to
    /// the CPU function.
    ///
    /// # Panics
    /// On the sizes `safe_m::merge_tensor` panics on.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_tensor(
        &self,
        receiver: &[f32],
        receiver_y: &[f32],
        receiver_election: ElectionParams,
        ancestor: &[f32],
        ancestor_y: &[f32],
        x_mean: &[f32],
        contributors: &[Contributor<'_>],
        is_bias: bool,
        epsilon: f32,
    ) -> Result<MergedTensor, Error> {
        safe_m::merge_tensor_on(
            self,
            receiver,
            receiver_y,
            receiver_election,
            ancestor,
            ancestor_y,
            x_mean,
            contributors,
            is_bias,
            epsilon,
        )
    }

    /// `fam::correlation` (SPEC §2.3): `Â Bᵀ` of standardised columns
    /// (`[n_a, N]` and `[n_b, N]`), `[n_a, n_b]` row-major. On a device each
    /// entry is the f64 sum of exact products rounded once; the CPU's sgemm
    /// sums in f32, so the two differ by at most about `N·2⁻²⁴` for unit
    /// columns (the tests allow `4·N·2⁻²⁴`). `B` must fit in device memory
    /// whole; rows of `A` are chunked.
    ///
    /// # Panics
    /// On the sizes `fam::correlation` panics on.
    pub fn correlation(
        &self,
        a: &[f32],
        n_a: usize,
        b: &[f32],
        n_b: usize,
    ) -> Result<Vec<f32>, Error> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            let rows = a.len().checked_div(n_a).unwrap_or(0);
            assert_eq!(
                b.len(),
                n_b * rows,
                "correlation: A and B differ in probe rows"
            );
            return gpu.correlation(self.memory_limit, a, n_a, b, n_b, rows);
        }
        Ok(fam::correlation(a, n_a, b, n_b))
    }
}

/// The accelerator as the element-wise stages of `safe_m::merge_tensor_on`:
/// each runs on the device when there is one, else on the CPU.
impl safe_m::Kernels for Accelerator {
    type Error = Error;

    fn score_matrix(
        &self,
        weight: &[f32],
        u: &[f32],
        v: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        Accelerator::score_matrix(self, weight, u, v, form, out)
    }

    fn score_vector(
        &self,
        bias: &[f32],
        u: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        Accelerator::score_vector(self, bias, u, form, out)
    }

    fn fuse_block(
        &self,
        receiver: &[f32],
        ancestor: &[f32],
        receiver_election: Election<'_>,
        contributors: &[ContributorBlock<'_>],
        direction: Option<(&[f32], f64)>,
        epsilon: f32,
        out: &mut [f32],
        counts: &mut [MaskCounts],
    ) -> Result<(), Error> {
        Accelerator::fuse_block(
            self,
            receiver,
            ancestor,
            receiver_election,
            contributors,
            direction,
            epsilon,
            out,
            counts,
        )
    }
}
