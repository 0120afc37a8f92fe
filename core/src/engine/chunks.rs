//! Chunked parallel passes shared by the methods: reading tensor ranges as
//! f32, filling an output tensor chunk by chunk, the element-wise fallback
//! blend, dtype conversion, and exact parallel selections.
//!
//! Chunk boundaries depend on the tensor's shape only, and every reduction
//! over chunks is either an integer count or an f64 sum taken in chunk
//! order, so results do not depend on the thread count.

use super::CHUNK_ELEMENTS;
use crate::dtype::{encode_f32, Dtype};
use crate::io::TensorView;
use crate::safe_m::fallback_blend;
use crate::select::{
    elect_count, InsideKeys, KeyOf, RadixSelect, SampleBracket, RADIX_BUCKETS, SAMPLE_SIZE,
};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Rows per work item for rows of `cols` elements (rows are never split).
pub(crate) fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK_ELEMENTS / cols.max(1)).max(1)
}

/// Decodes elements `[start, start + len)` of a float tensor into `buf`
/// (a LoRA update included, see [`TensorView::read_f32`]).
pub(crate) fn read(view: &TensorView<'_>, start: usize, len: usize, buf: &mut Vec<f32>) {
    buf.resize(len, 0.0);
    view.read_f32(start, buf);
}

/// A zeroed buffer of `n` elements for a whole tensor. Large ones ask for
/// transparent huge pages: a fresh buffer's page faults (one per 4 KiB,
/// each zeroing its page) otherwise cost more than the merge arithmetic.
pub(crate) fn tensor_buffer<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut buffer: Vec<T> = Vec::with_capacity(n);
    let bytes = n * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_PAGE {
        let start = buffer.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let end = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
        if aligned < end {
            // SAFETY: advice on memory this buffer owns and has not touched;
            // it changes page sizes, never contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    buffer.resize(n, T::default());
    buffer
}

/// Transparent huge pages are 2 MiB on x86-64 and most aarch64 kernels.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// The whole tensor as f32, decoded in parallel.
pub(crate) fn read_all(view: &TensorView<'_>) -> Vec<f32> {
    let mut out = tensor_buffer::<f32>(view.numel());
    out.par_chunks_mut(CHUNK_ELEMENTS)
        .enumerate()
        .for_each(|(chunk, values)| view.read_f32(chunk * CHUNK_ELEMENTS, values));
    out
}

/// An output tensor of `n` elements in `out_dtype`, filled in parallel
/// chunks of `chunk` elements: `fill(start, values, scratch)` writes the f32
/// values of elements `[start, start + values.len())`; `scratch` is per thread.
pub(crate) fn par_encode<S, F>(n: usize, out_dtype: Dtype, chunk: usize, fill: F) -> Vec<u8>
where
    S: Default + Send,
    F: Fn(usize, &mut [f32], &mut S) + Sync,
{
    let chunk = chunk.max(1);
    let mut out = tensor_buffer::<u8>(n * out_dtype.size());
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
pub(crate) fn convert(view: &TensorView<'_>, out_dtype: Dtype) -> Vec<u8> {
    if view.dtype == out_dtype && view.lora.is_none() && view.rows.is_none() {
        return view.data.to_vec();
    }
    blend(view, &[], 0.0, out_dtype)
}

/// SPEC §1.4 on a whole tensor: `(1 − w)·A + w·mean(B)`.
pub(crate) fn blend(
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

/// The `m`-th largest key (1-based) of `key(x)` over `data`, exactly: a
/// sample brackets the key, one parallel pass counts the keys above the
/// bracket and gathers those inside (runs of equal keys where a chunk holds
/// many: [`InsideKeys`]), and the key is selected among them. Should the
/// bracket miss (or gather too many distinct keys), a radix select whose
/// histograms are counted in parallel chunks decides. Either way the
/// result depends on the data alone.
pub fn parallel_select(data: &[f32], m: usize, key: KeyOf) -> u32 {
    if data.len() >= 4 * SAMPLE_SIZE {
        if let Some(found) = sampled_select(data, m, key) {
            return found;
        }
    }
    let mut select = RadixSelect::new(m);
    while !select.is_done() {
        let hist = data
            .par_chunks(CHUNK_ELEMENTS)
            .map(|chunk| {
                let mut hist = Box::new([0u64; RADIX_BUCKETS]);
                select.count_keys(chunk.iter().map(|&x| key.of(x)), &mut hist);
                hist
            })
            .reduce(|| Box::new([0u64; RADIX_BUCKETS]), add_histograms);
        select.advance(&hist);
    }
    select.key()
}

/// [`parallel_select`]'s one-pass path; `None` sends it to the radix select.
fn sampled_select(data: &[f32], m: usize, key: KeyOf) -> Option<u32> {
    let n = data.len();
    let bracket = SampleBracket::for_rank(n, m, |i| key.of(data[i]));
    let cap = SampleBracket::candidate_cap(n);
    let held = AtomicUsize::new(0);
    let parts: Vec<(u64, usize, InsideKeys)> = data
        .par_chunks(CHUNK_ELEMENTS)
        .map(|chunk| {
            let (above, mut inside) = InsideKeys::scan(chunk, key, bracket);
            let entries = inside.entries();
            // Past the cap the result is `None` anyway: stop holding keys.
            if held.fetch_add(entries, Ordering::Relaxed) + entries > cap {
                inside = InsideKeys::Keys(Vec::new());
            }
            (above, entries, inside)
        })
        .collect();
    if parts.iter().map(|p| p.1).sum::<usize>() > cap {
        return None;
    }
    let above = parts.iter().map(|p| p.0).sum();
    bracket.resolve_chunks(above, parts.iter().map(|p| &p.2), m)
}

/// Adds two radix histograms.
pub(crate) fn add_histograms(
    mut a: Box<[u64; RADIX_BUCKETS]>,
    b: Box<[u64; RADIX_BUCKETS]>,
) -> Box<[u64; RADIX_BUCKETS]> {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        *x += y;
    }
    a
}

/// The election threshold over all scores (SPEC §1.2).
pub(crate) fn parallel_threshold(scores: &[f32], density: f64) -> f32 {
    match elect_count(density, scores.len()) {
        0 => 0.0,
        m => f32::from_bits(parallel_select(scores, m, KeyOf::Score)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::kth_largest;

    #[test]
    fn every_instruction_set_scans_a_bracket_alike() {
        let data: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let bracket = SampleBracket {
            lo: 100f32.to_bits(),
            hi: 200f32.to_bits(),
        };
        for key in [KeyOf::Score, KeyOf::Magnitude] {
            let mut reference = Vec::new();
            let above = crate::select::scan_bracket(&data, key, bracket, &mut reference);
            let expected: Vec<u32> = data
                .iter()
                .map(|&x| key.of(x))
                .filter(|&k| bracket.holds(k))
                .collect();
            assert_eq!(reference, expected);
            assert_eq!(
                above,
                data.iter().filter(|&&x| key.of(x) > bracket.hi).count() as u64
            );
        }
    }

    fn radix(data: &[f32], m: usize) -> u32 {
        kth_largest(data, m).to_bits()
    }

    #[test]
    fn the_sampled_select_agrees_with_the_radix_select() {
        let n = 300_000;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let uniform: Vec<f32> = (0..n).map(|_| (next() >> 40) as f32).collect();
        // Mostly zeros (an update that leaves most entries alone).
        let sparse: Vec<f32> = (0..n)
            .map(|_| {
                if next() % 10 == 0 {
                    (next() >> 44) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let constant = vec![0.5f32; n];
        let few_values: Vec<f32> = (0..n).map(|_| (next() % 3) as f32).collect();
        let ascending: Vec<f32> = (0..n).map(|i| i as f32).collect();
        // One large column in rows of 1024: a strided sample would see it always or never.
        let columns: Vec<f32> = (0..n)
            .map(|i| {
                if i % 1024 == 0 {
                    1e6
                } else {
                    (next() >> 50) as f32
                }
            })
            .collect();
        let signed: Vec<f32> = uniform
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 3 == 0 { -x } else { x })
            .collect();
        let magnitudes: Vec<f32> = signed.iter().map(|x| x.abs()).collect();
        assert!(
            sampled_select(&uniform, n / 5, KeyOf::Score).is_some(),
            "the one-pass path runs"
        );
        for m in [1, 293, n / 5, n] {
            assert_eq!(
                parallel_select(&signed, m, KeyOf::Magnitude),
                radix(&magnitudes, m)
            );
        }
        for data in [
            &uniform,
            &sparse,
            &constant,
            &few_values,
            &ascending,
            &columns,
        ] {
            for m in [1, 2, 293, n / 5, n / 2, n - 1, n] {
                assert_eq!(
                    parallel_select(data, m, KeyOf::Score),
                    radix(data, m),
                    "m = {m}"
                );
            }
        }
    }

    #[test]
    fn the_parallel_select_agrees_with_a_sort_on_adversarial_data_at_any_thread_count() {
        let n = 200_003;
        let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
            .iter()
            .map(|&t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            })
            .collect();
        for (name, data) in crate::select::tests::adversarial(n) {
            for key in [KeyOf::Score, KeyOf::Magnitude] {
                let mut sorted: Vec<u32> = data.iter().map(|&x| key.of(x)).collect();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for m in [1, 2, n / 5, n / 2, n - 1, n] {
                    for pool in &pools {
                        assert_eq!(
                            pool.install(|| parallel_select(&data, m, key)),
                            sorted[m - 1],
                            "{name}, {key:?}, m = {m}, {} threads",
                            pool.current_num_threads()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn equal_keys_keep_the_one_pass_path() {
        let n = 300_000;
        let adversarial = crate::select::tests::adversarial(n);
        for (name, data) in &adversarial {
            if *name == "all equal" || *name == "bf16 differences" || *name == "half equal" {
                assert!(
                    sampled_select(data, n / 5, KeyOf::Magnitude).is_some(),
                    "{name}: no radix fallback"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn the_parallel_select_matches_the_radix_select(
            values in proptest::collection::vec(-4i8..=4, 1..=16),
            bf16_steps in proptest::collection::vec(-3i32..=3, 1..=16),
            n in 65_536usize..140_000,
            density in 0.0f64..1.0,
            magnitude: bool,
        ) {
            // Few distinct values (ties everywhere), some bf16 differences.
            let data: Vec<f32> = (0..n)
                .map(|i| {
                    let v = values[i * 7919 % values.len()] as f32 * 0.125;
                    let step = bf16_steps[i * 104_729 % bf16_steps.len()] as f32;
                    v + step * 2f32.powi(-13)
                })
                .collect();
            let key = if magnitude { KeyOf::Magnitude } else { KeyOf::Score };
            let m = elect_count(density, n);
            let keys: Vec<f32> = data.iter().map(|&x| f32::from_bits(key.of(x))).collect();
            proptest::prop_assert_eq!(parallel_select(&data, m, key), radix(&keys, m));
        }
    }
}
