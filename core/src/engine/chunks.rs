//! Chunked parallel passes shared by the methods: reading tensor ranges as
//! f32, filling an output tensor chunk by chunk, the element-wise fallback
//! blend, dtype conversion, and exact parallel selections.
//!
//! Chunk boundaries depend on the tensor's shape only, and every reduction
//! over chunks is either an integer count or an f64 sum taken in chunk
//! order, so results do not depend on the thread count.

use super::CHUNK_ELEMENTS;
use crate::dtype::{decode_f32, encode_f32, Dtype};
use crate::io::TensorView;
use crate::safe_m::fallback_blend;
use crate::select::{elect_count, score_key, RadixSelect, RADIX_BUCKETS};
use rayon::prelude::*;

/// Rows per work item for rows of `cols` elements (rows are never split).
pub(super) fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK_ELEMENTS / cols.max(1)).max(1)
}

/// Decodes elements `[start, start + len)` of a float tensor into `buf`.
pub(super) fn read(view: &TensorView<'_>, start: usize, len: usize, buf: &mut Vec<f32>) {
    buf.resize(len, 0.0);
    let size = view.dtype.size();
    decode_f32(
        view.dtype,
        &view.data[start * size..(start + len) * size],
        buf,
    );
}

/// The whole tensor as f32, decoded in parallel.
pub(super) fn read_all(view: &TensorView<'_>) -> Vec<f32> {
    let mut out = vec![0f32; view.numel()];
    out.par_chunks_mut(CHUNK_ELEMENTS)
        .enumerate()
        .for_each(|(chunk, values)| {
            let size = view.dtype.size();
            let start = chunk * CHUNK_ELEMENTS;
            decode_f32(
                view.dtype,
                &view.data[start * size..(start + values.len()) * size],
                values,
            );
        });
    out
}

/// An output tensor of `n` elements in `out_dtype`, filled in parallel
/// chunks of `chunk` elements: `fill(start, values, scratch)` writes the f32
/// values of elements `[start, start + values.len())`; `scratch` is per thread.
pub(super) fn par_encode<S, F>(n: usize, out_dtype: Dtype, chunk: usize, fill: F) -> Vec<u8>
where
    S: Default + Send,
    F: Fn(usize, &mut [f32], &mut S) + Sync,
{
    let chunk = chunk.max(1);
    let mut out = vec![0u8; n * out_dtype.size()];
    out.par_chunks_mut(chunk * out_dtype.size())
        .enumerate()
        .for_each_init(
            || (Vec::new(), S::default()),
            |(values, scratch), (index, bytes)| {
                values.resize(bytes.len() / out_dtype.size(), 0.0);
                fill(index * chunk, values, scratch);
                encode_f32(out_dtype, values, bytes);
            },
        );
    out
}

/// The receiver's tensor in the output dtype: a byte copy when the dtype is
/// kept, else decoded and re-encoded.
pub(super) fn convert(view: &TensorView<'_>, out_dtype: Dtype) -> Vec<u8> {
    if view.dtype == out_dtype {
        return view.data.to_vec();
    }
    blend(view, &[], 0.0, out_dtype)
}

/// SPEC §1.4 on a whole tensor: `(1 − w)·A + w·mean(B)`.
pub(super) fn blend(
    receiver: &TensorView<'_>,
    contributors: &[TensorView<'_>],
    weight: f32,
    out_dtype: Dtype,
) -> Vec<u8> {
    type Scratch = (Vec<f32>, Vec<Vec<f32>>);
    par_encode(
        receiver.numel(),
        out_dtype,
        CHUNK_ELEMENTS,
        |start, merged, (a, bs): &mut Scratch| {
            read(receiver, start, merged.len(), a);
            bs.resize_with(contributors.len(), Vec::new);
            for (b, view) in bs.iter_mut().zip(contributors) {
                read(view, start, merged.len(), b);
            }
            let refs: Vec<&[f32]> = bs.iter().map(Vec::as_slice).collect();
            fallback_blend(a, &refs, weight, merged);
        },
    )
}

/// The `m`-th largest key (1-based) of `key(x)` over `data`: a radix select
/// whose histograms are counted in parallel chunks and summed.
pub(super) fn parallel_select(data: &[f32], m: usize, key: impl Fn(f32) -> u32 + Sync) -> u32 {
    let mut select = RadixSelect::new(m);
    while !select.is_done() {
        let hist = data
            .par_chunks(CHUNK_ELEMENTS)
            .map(|chunk| {
                let mut hist = Box::new([0u64; RADIX_BUCKETS]);
                select.count_keys(chunk.iter().map(|&x| key(x)), &mut hist);
                hist
            })
            .reduce(|| Box::new([0u64; RADIX_BUCKETS]), add_histograms);
        select.advance(&hist);
    }
    select.key()
}

/// Adds two radix histograms.
pub(super) fn add_histograms(
    mut a: Box<[u64; RADIX_BUCKETS]>,
    b: Box<[u64; RADIX_BUCKETS]>,
) -> Box<[u64; RADIX_BUCKETS]> {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        *x += y;
    }
    a
}

/// The election threshold over all scores (SPEC §1.2).
pub(super) fn parallel_threshold(scores: &[f32], density: f64) -> f32 {
    match elect_count(density, scores.len()) {
        0 => 0.0,
        m => f32::from_bits(parallel_select(scores, m, score_key)),
    }
}
