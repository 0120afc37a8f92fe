//! The device side: opening a device once per process, compiling
//! `kernels.cu` with NVRTC, and running each operation in row chunks that
//! fit the call's memory budget. Every buffer is sized for the largest
//! chunk and reused; each call has its own stream.

use crate::chunks::{self, Footprint};
use crate::{Error, ErrorKind};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use flatmerge::safe_m::{ContributorBlock, Election, MaskCounts, ScoreForm};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

const SOURCE: &str = include_str!("kernels.cu");

/// Threads per block of the one-dimensional kernels (a multiple of 32, as
/// `row_coefficients` needs whole warps).
const BLOCK: u32 = 256;

/// Blocks of a grid-stride launch: enough to fill any current GPU; larger
/// inputs loop.
const MAX_BLOCKS: u64 = 1 << 16;

/// `correlation`'s tile edge (`TILE` in kernels.cu); its grid's y extent is
/// at most 65535 blocks.
const TILE: u32 = 16;

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::new(ErrorKind::Driver, format!("CUDA driver: {e}"))
    }
}

fn compile_error(e: CompileError) -> String {
    match e {
        CompileError::CompileError { log, options, .. } => format!(
            "NVRTC could not compile the kernels (options {options:?}): {}",
            log.to_string_lossy()
        ),
        other => format!("NVRTC: {other:?}"),
    }
}

/// The kernels of `kernels.cu`, loaded on one device.
#[derive(Debug)]
struct Kernels {
    score_matrix: CudaFunction,
    score_vector: CudaFunction,
    count_elected: CudaFunction,
    masked_task_vector: CudaFunction,
    row_coefficients: CudaFunction,
    add_decoupled: CudaFunction,
    add_scaled: CudaFunction,
    correlation: CudaFunction,
}

/// One opened device with its compiled kernels.
#[derive(Debug)]
pub(crate) struct Gpu {
    ctx: Arc<CudaContext>,
    name: String,
    kernels: Kernels,
}

/// Devices opened so far, and why the ones that failed did: a device is
/// probed (and the kernels compiled) once per process.
type Opened = Vec<(usize, Result<Arc<Gpu>, String>)>;
static DEVICES: Mutex<Opened> = Mutex::new(Vec::new());

/// Device `ordinal`, opened on first use; the reason it cannot be used otherwise.
pub(crate) fn open(ordinal: usize) -> Result<Arc<Gpu>, String> {
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, opened)) = devices.iter().find(|(d, _)| *d == ordinal) {
        return opened.clone();
    }
    // cudarc panics on a symbol the loaded library lacks (an older driver
    // than the bindings): that too is "no usable device", not a crash.
    let opened = catch_unwind(AssertUnwindSafe(|| Gpu::open(ordinal))).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("the CUDA libraries failed to load: {text}"))
    });
    devices.push((ordinal, opened.clone()));
    opened
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Arc<Gpu>, String> {
        // SAFETY: these only try to dlopen the libraries; checking first
        // matters because cudarc panics on a missing library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) was not found".into());
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("NVRTC (libnvrtc.so.13, .so.12 or .so.11) was not found".into());
        }
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(format!("there is no CUDA device {ordinal} ({count} found)"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unnamed".into());
        // Exact IEEE f32 arithmetic, no contraction: bit-identical to the
        // CPU (kernels.cu says where FMA would round differently). No
        // `arch`: NVRTC's default virtual architecture, which the driver
        // JIT-compiles for whatever device this is.
        let options = CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, options).map_err(compile_error)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the kernels on device {ordinal}: {e}"))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| format!("kernel `{name}`: {e}"))
        };
        let kernels = Kernels {
            score_matrix: load("score_matrix")?,
            score_vector: load("score_vector")?,
            count_elected: load("count_elected")?,
            masked_task_vector: load("masked_task_vector")?,
            row_coefficients: load("row_coefficients")?,
            add_decoupled: load("add_decoupled")?,
            add_scaled: load("add_scaled")?,
            correlation: load("correlation")?,
        };
        Ok(Arc::new(Gpu { ctx, name, kernels }))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A stream for one call, and the bytes the call may allocate.
    fn begin(&self, limit: Option<usize>) -> Result<(Arc<CudaStream>, usize), Error> {
        let stream = self.ctx.new_stream()?;
        let (free, _) = self.ctx.mem_get_info()?;
        Ok((stream, chunks::budget(free, limit)))
    }

    pub(crate) fn score_matrix(
        &self,
        limit: Option<usize>,
        weight: &[f32],
        u: &[f32],
        v: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let (rows, cols) = (u.len(), v.len());
        if weight.is_empty() {
            return Ok(());
        }
        let (stream, budget) = self.begin(limit)?;
        let footprint = Footprint {
            fixed: 4 * cols,
            per_unit: 8 * cols + 4,
        };
        let plan = chunks::plan(rows, footprint, budget, usize::MAX)?;
        let most = largest(&plan);
        let v_dev = stream.clone_htod(v)?;
        let mut w_dev = zeros::<f32>(&stream, most * cols)?;
        let mut u_dev = zeros::<f32>(&stream, most)?;
        let mut out_dev = zeros::<f32>(&stream, most * cols)?;
        let (ratio, param) = form_args(form);
        let cols64 = cols as u64;
        for chunk in plan {
            let elements = chunk.start * cols..chunk.end * cols;
            stream.memcpy_htod(&weight[elements.clone()], &mut w_dev)?;
            stream.memcpy_htod(&u[chunk.clone()], &mut u_dev)?;
            let rows64 = chunk.len() as u64;
            let mut launch = stream.launch_builder(&self.kernels.score_matrix);
            launch
                .arg(&w_dev)
                .arg(&u_dev)
                .arg(&v_dev)
                .arg(&rows64)
                .arg(&cols64)
                .arg(&ratio)
                .arg(&param)
                .arg(&mut out_dev);
            // SAFETY: the arguments match `score_matrix` in kernels.cu, and
            // the buffers hold at least rows64·cols64 (and rows64, cols64) values.
            unsafe { launch.launch(grid(rows64 * cols64)) }?;
            stream.memcpy_dtoh(&out_dev.slice(..elements.len()), &mut out[elements])?;
        }
        stream.synchronize()?;
        Ok(())
    }

    pub(crate) fn score_vector(
        &self,
        limit: Option<usize>,
        bias: &[f32],
        u: &[f32],
        form: ScoreForm,
        out: &mut [f32],
    ) -> Result<(), Error> {
        if bias.is_empty() {
            return Ok(());
        }
        let (stream, budget) = self.begin(limit)?;
        let footprint = Footprint {
            fixed: 0,
            per_unit: 12,
        };
        let plan = chunks::plan(bias.len(), footprint, budget, usize::MAX)?;
        let most = largest(&plan);
        let mut b_dev = zeros::<f32>(&stream, most)?;
        let mut u_dev = zeros::<f32>(&stream, most)?;
        let mut out_dev = zeros::<f32>(&stream, most)?;
        let (ratio, param) = form_args(form);
        for chunk in plan {
            stream.memcpy_htod(&bias[chunk.clone()], &mut b_dev)?;
            stream.memcpy_htod(&u[chunk.clone()], &mut u_dev)?;
            let n = chunk.len() as u64;
            let mut launch = stream.launch_builder(&self.kernels.score_vector);
            launch
                .arg(&b_dev)
                .arg(&u_dev)
                .arg(&n)
                .arg(&ratio)
                .arg(&param)
                .arg(&mut out_dev);
            // SAFETY: the arguments match `score_vector`; the buffers hold n values.
            unsafe { launch.launch(grid(n)) }?;
            stream.memcpy_dtoh(&out_dev.slice(..chunk.len()), &mut out[chunk])?;
        }
        stream.synchronize()?;
        Ok(())
    }

    pub(crate) fn count_elected(
        &self,
        limit: Option<usize>,
        scores: &[f32],
        threshold: f32,
    ) -> Result<u64, Error> {
        if scores.is_empty() {
            return Ok(0);
        }
        let (stream, budget) = self.begin(limit)?;
        let footprint = Footprint {
            fixed: 8,
            per_unit: 4,
        };
        let plan = chunks::plan(scores.len(), footprint, budget, usize::MAX)?;
        let mut s_dev = zeros::<f32>(&stream, largest(&plan))?;
        let mut count = zeros::<u64>(&stream, 1)?;
        for chunk in plan {
            stream.memcpy_htod(&scores[chunk.clone()], &mut s_dev)?;
            self.count(&stream, &s_dev, chunk.len(), threshold, &mut count)?;
        }
        let count = stream.clone_dtoh(&count)?;
        Ok(count[0])
    }

    /// Adds `|{i < n : is_elected(scores[i], threshold)}|` to `count`.
    fn count(
        &self,
        stream: &Arc<CudaStream>,
        scores: &CudaSlice<f32>,
        n: usize,
        threshold: f32,
        count: &mut CudaSlice<u64>,
    ) -> Result<(), Error> {
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.kernels.count_elected);
        launch.arg(scores).arg(&n).arg(&threshold).arg(count);
        // SAFETY: the arguments match `count_elected`; `scores` holds n values.
        unsafe { launch.launch(grid(n)) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fuse_block(
        &self,
        limit: Option<usize>,
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
        let cols = direction.map_or(n, |(d, _)| d.len());
        // As safe_m::fuse_block: nothing to fuse, nothing counted.
        out.copy_from_slice(receiver);
        if cols == 0 || n == 0 {
            return Ok(());
        }
        // A weight is chunked by rows, a bias (no direction) by elements.
        let (units, per_unit) = match direction {
            Some(_) => (n / cols, cols),
            None => (n, 1),
        };
        let (stream, budget) = self.begin(limit)?;
        let footprint = Footprint {
            fixed: direction.map_or(0, |_| 4 * cols) + 8 * (3 * contributors.len() + 1),
            // a, c, scores_a, b, scores_b, tau, out; one coefficient per row.
            per_unit: 28 * per_unit + direction.map_or(0, |_| 4),
        };
        // Four threads per row in `row_coefficients`, in a one-dimensional grid.
        let max_rows = (u32::MAX as usize / 4).saturating_sub(BLOCK as usize);
        let plan = chunks::plan(units, footprint, budget, max_rows)?;
        let most = largest(&plan) * per_unit;
        let mut a_dev = zeros::<f32>(&stream, most)?;
        let mut c_dev = zeros::<f32>(&stream, most)?;
        let mut sa_dev = zeros::<f32>(&stream, most)?;
        let mut b_dev = zeros::<f32>(&stream, most)?;
        let mut sb_dev = zeros::<f32>(&stream, most)?;
        let mut tau_dev = zeros::<f32>(&stream, most)?;
        let mut out_dev = zeros::<f32>(&stream, most)?;
        let mut coef_dev = zeros::<f32>(&stream, largest(&plan))?;
        let d_dev = match direction {
            Some((d, _)) => Some(stream.clone_htod(d)?),
            None => None,
        };
        let mut receiver_count = zeros::<u64>(&stream, 1)?;
        let mut contributor_counts = contributors
            .iter()
            .map(|_| zeros::<u64>(&stream, 3))
            .collect::<Result<Vec<_>, _>>()?;
        let threshold_a = receiver_election.threshold;
        let cols64 = cols as u64;
        let dd = direction.map_or(0.0, |(_, dd)| dd);
        for chunk in plan {
            let elements = chunk.start * per_unit..chunk.end * per_unit;
            let len = elements.len() as u64;
            let rows64 = chunk.len() as u64;
            stream.memcpy_htod(&receiver[elements.clone()], &mut a_dev)?;
            stream.memcpy_htod(&receiver[elements.clone()], &mut out_dev)?;
            stream.memcpy_htod(&ancestor[elements.clone()], &mut c_dev)?;
            stream.memcpy_htod(&receiver_election.scores[elements.clone()], &mut sa_dev)?;
            self.count(
                &stream,
                &sa_dev,
                elements.len(),
                threshold_a,
                &mut receiver_count,
            )?;
            for (contributor, count_dev) in contributors.iter().zip(&mut contributor_counts) {
                stream.memcpy_htod(&contributor.weight[elements.clone()], &mut b_dev)?;
                stream.memcpy_htod(&contributor.election.scores[elements.clone()], &mut sb_dev)?;
                let threshold_b = contributor.election.threshold;
                let mut launch = stream.launch_builder(&self.kernels.masked_task_vector);
                launch
                    .arg(&a_dev)
                    .arg(&c_dev)
                    .arg(&sa_dev)
                    .arg(&threshold_a)
                    .arg(&b_dev)
                    .arg(&sb_dev)
                    .arg(&threshold_b)
                    .arg(&len)
                    .arg(&mut tau_dev)
                    .arg(count_dev);
                // SAFETY: the arguments match `masked_task_vector`; every
                // buffer holds `len` values and the counts 3.
                unsafe { launch.launch(grid(len)) }?;
                let (lambda_proj, lambda_ortho) =
                    (contributor.lambda_proj, contributor.lambda_ortho);
                match &d_dev {
                    Some(d_dev) => {
                        let mut launch = stream.launch_builder(&self.kernels.row_coefficients);
                        launch
                            .arg(&tau_dev)
                            .arg(d_dev)
                            .arg(&rows64)
                            .arg(&cols64)
                            .arg(&dd)
                            .arg(&epsilon)
                            .arg(&mut coef_dev);
                        let threads = u32::try_from(4 * rows64).map_err(|_| {
                            Error::new(ErrorKind::TooLarge, "too many rows for one launch")
                        })?;
                        let config = LaunchConfig {
                            grid_dim: (threads.div_ceil(BLOCK), 1, 1),
                            block_dim: (BLOCK, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: the arguments match `row_coefficients`;
                        // tau holds rows64·cols64 values, d cols64, coef rows64.
                        unsafe { launch.launch(config) }?;
                        let mut launch = stream.launch_builder(&self.kernels.add_decoupled);
                        launch
                            .arg(&mut out_dev)
                            .arg(&tau_dev)
                            .arg(d_dev)
                            .arg(&coef_dev)
                            .arg(&rows64)
                            .arg(&cols64)
                            .arg(&lambda_proj)
                            .arg(&lambda_ortho);
                        // SAFETY: the arguments match `add_decoupled`; sizes as above.
                        unsafe { launch.launch(grid(len)) }?;
                    }
                    None => {
                        let mut launch = stream.launch_builder(&self.kernels.add_scaled);
                        launch
                            .arg(&mut out_dev)
                            .arg(&tau_dev)
                            .arg(&len)
                            .arg(&lambda_proj);
                        // SAFETY: the arguments match `add_scaled`; both hold `len` values.
                        unsafe { launch.launch(grid(len)) }?;
                    }
                }
            }
            stream.memcpy_dtoh(&out_dev.slice(..elements.len()), &mut out[elements])?;
        }
        let receiver_elected = stream.clone_dtoh(&receiver_count)?[0];
        for (count, count_dev) in counts.iter_mut().zip(&contributor_counts) {
            let c = stream.clone_dtoh(count_dev)?;
            count.add(&MaskCounts {
                receiver_elected,
                elected: c[0],
                conflicts: c[1],
                kept: c[2],
            });
        }
        Ok(())
    }

    pub(crate) fn correlation(
        &self,
        limit: Option<usize>,
        a: &[f32],
        n_a: usize,
        b: &[f32],
        n_b: usize,
        rows: usize,
    ) -> Result<Vec<f32>, Error> {
        let mut out = vec![0f32; n_a * n_b];
        if n_a == 0 || n_b == 0 || rows == 0 {
            return Ok(out);
        }
        let (stream, budget) = self.begin(limit)?;
        let footprint = Footprint {
            fixed: 4 * n_b * rows,
            per_unit: 4 * (rows + n_b),
        };
        let max_rows = 65_535 * TILE as usize;
        let plan = chunks::plan(n_a, footprint, budget, max_rows)?;
        let most = largest(&plan);
        let b_dev = stream.clone_htod(b)?;
        let mut a_dev = zeros::<f32>(&stream, most * rows)?;
        let mut out_dev = zeros::<f32>(&stream, most * n_b)?;
        let (n_b64, rows64) = (n_b as u64, rows as u64);
        let blocks_x = u32::try_from(n_b.div_ceil(TILE as usize))
            .map_err(|_| Error::new(ErrorKind::TooLarge, "too many columns for one launch"))?;
        for chunk in plan {
            stream.memcpy_htod(&a[chunk.start * rows..chunk.end * rows], &mut a_dev)?;
            let n_a64 = chunk.len() as u64;
            let mut launch = stream.launch_builder(&self.kernels.correlation);
            launch
                .arg(&a_dev)
                .arg(&b_dev)
                .arg(&n_a64)
                .arg(&n_b64)
                .arg(&rows64)
                .arg(&mut out_dev);
            let config = LaunchConfig {
                grid_dim: (blocks_x, chunk.len().div_ceil(TILE as usize) as u32, 1),
                block_dim: (TILE, TILE, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `correlation`; a holds n_a64·rows64
            // values, b n_b64·rows64, out n_a64·n_b64; the grid's y extent is
            // at most 65535 by the plan's cap.
            unsafe { launch.launch(config) }?;
            let outs = chunk.start * n_b..chunk.end * n_b;
            stream.memcpy_dtoh(&out_dev.slice(..outs.len()), &mut out[outs])?;
        }
        stream.synchronize()?;
        Ok(out)
    }
}

/// `(ratio, param)` of the kernels' `safe_score`.
fn form_args(form: ScoreForm) -> (i32, f32) {
    match form {
        ScoreForm::Sas { alpha } => (0, alpha),
        ScoreForm::Ratio { epsilon } => (1, epsilon),
    }
}

/// The grid of a grid-stride launch over `n` elements.
fn grid(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The longest chunk of a plan (at least 1, so that buffers are never empty).
fn largest(plan: &[std::ops::Range<usize>]) -> usize {
    plan.iter().map(|c| c.len()).max().unwrap_or(0).max(1)
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>, Error> {
    Ok(stream.alloc_zeros::<T>(len.max(1))?)
}
