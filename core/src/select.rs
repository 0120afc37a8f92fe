//! Exact top-k election (SPEC §1.2): the threshold is the value of the
//! `m`-th largest score of a tensor, found in O(n) by a radix select over
//! the bits of the scores, without sorting and without sampling.
//!
//! Non-negative f32 values order like their bit patterns read as `u32`, so
//! three counting passes over 11, 11 and 10 bits pin the `m`-th largest
//! pattern down exactly. Scores that are NaN, negative or zero get key 0:
//! they can never pass an election, whose mask also requires `S > 0`.

/// How many parameters a tensor of `n` elements elects at density `k`:
/// `m = ⌈k·n − 10⁻⁶⌉` clamped to `[1, n]` (0 when `n = 0`). The `10⁻⁶`
/// keeps float products such as `0.3·10` from rounding up to the next count.
pub fn elect_count(density: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let m = libm::ceil(density * n as f64 - 1e-6);
    if m.is_nan() || m < 1.0 {
        1
    } else if m >= n as f64 {
        n
    } else {
        m as usize
    }
}

/// The ordering key of a score: its bit pattern when positive, else 0.
#[inline]
pub fn score_key(score: f32) -> u32 {
    if score > 0.0 {
        score.to_bits()
    } else {
        0
    }
}

/// Whether a score is elected against threshold `t`: `S ≥ t ∧ S > 0`.
#[inline]
pub fn is_elected(score: f32, threshold: f32) -> bool {
    score >= threshold && score > 0.0
}

/// Bits examined by each pass, from the most significant: (shift, width).
const PASSES: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// Buckets of one pass's histogram.
pub const RADIX_BUCKETS: usize = 1 << 11;

/// A radix select in progress. Callers that split the data (threads,
/// chunks) call [`RadixSelect::count`] on each part with its own histogram,
/// add the histograms (integer counts: any split gives the same sum), then
/// [`RadixSelect::advance`]; [`kth_largest`] does this on one slice.
#[derive(Debug, Clone)]
pub struct RadixSelect {
    prefix: u32,
    prefix_mask: u32,
    /// Rank, counted from the top, of the wanted key among those matching the prefix.
    remaining: u64,
    pass: usize,
}

impl RadixSelect {
    /// Starts a search for the `m`-th largest (1-based) key.
    ///
    /// # Panics
    /// If `m == 0`.
    pub fn new(m: usize) -> Self {
        assert!(m > 0, "RadixSelect: m must be at least 1");
        RadixSelect {
            prefix: 0,
            prefix_mask: 0,
            remaining: m as u64,
            pass: 0,
        }
    }

    /// Whether the threshold is known.
    pub fn is_done(&self) -> bool {
        self.pass == PASSES.len()
    }

    /// Adds the keys of `scores` that match the prefix found so far to `hist`.
    pub fn count(&self, scores: &[f32], hist: &mut [u64; RADIX_BUCKETS]) {
        self.count_keys(scores.iter().map(|&s| score_key(s)), hist);
    }

    /// As [`RadixSelect::count`], for keys computed by the caller.
    pub fn count_keys(&self, keys: impl Iterator<Item = u32>, hist: &mut [u64; RADIX_BUCKETS]) {
        let (shift, width) = PASSES[self.pass];
        let digit_mask = (1u32 << width) - 1;
        for key in keys {
            if key & self.prefix_mask == self.prefix {
                hist[((key >> shift) & digit_mask) as usize] += 1;
            }
        }
    }

    /// Fixes the next digit from the summed histogram of all the data.
    ///
    /// # Panics
    /// If the histogram holds fewer keys than the rank sought (the data
    /// changed between passes, or `m` exceeds the element count).
    pub fn advance(&mut self, hist: &[u64; RADIX_BUCKETS]) {
        let (shift, width) = PASSES[self.pass];
        let mut bucket = (1usize << width) - 1;
        loop {
            if hist[bucket] >= self.remaining {
                break;
            }
            self.remaining -= hist[bucket];
            assert!(bucket > 0, "RadixSelect: fewer keys than the rank sought");
            bucket -= 1;
        }
        self.prefix |= (bucket as u32) << shift;
        self.prefix_mask |= ((1u32 << width) - 1) << shift;
        self.pass += 1;
    }

    /// The key found, valid once [`RadixSelect::is_done`].
    pub fn key(&self) -> u32 {
        self.prefix
    }

    /// The threshold found, as a score.
    pub fn threshold(&self) -> f32 {
        f32::from_bits(self.prefix)
    }
}

/// The `m`-th largest score (1-based; scores that are not positive count
/// as 0), exactly, in three passes over `scores`.
///
/// # Panics
/// If `m == 0` or `m > scores.len()`.
pub fn kth_largest(scores: &[f32], m: usize) -> f32 {
    assert!(
        m <= scores.len(),
        "kth_largest: m exceeds the element count"
    );
    let mut select = RadixSelect::new(m);
    while !select.is_done() {
        let mut hist = [0u64; RADIX_BUCKETS];
        select.count(scores, &mut hist);
        select.advance(&hist);
    }
    select.threshold()
}

/// The election threshold of a tensor at density `k` (SPEC §1.2): the
/// value of its `⌈k·n − 10⁻⁶⌉`-th largest score; 0 for an empty tensor.
pub fn election_threshold(scores: &[f32], density: f64) -> f32 {
    match elect_count(density, scores.len()) {
        0 => 0.0,
        m => kth_largest(scores, m),
    }
}

/// What a selection ranks: scores as they are ([`score_key`]), or values by
/// magnitude (`score_key(|x|)`, the TIES trim's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOf {
    /// [`score_key`] of the value.
    Score,
    /// [`score_key`] of the value's magnitude.
    Magnitude,
}

impl KeyOf {
    fn sign_mask(self) -> u32 {
        match self {
            KeyOf::Score => u32::MAX,
            KeyOf::Magnitude => 0x7fff_ffff,
        }
    }

    /// The key of `x`.
    #[inline]
    pub fn of(self, x: f32) -> u32 {
        score_key(f32::from_bits(x.to_bits() & self.sign_mask()))
    }
}

/// One pass of the bracketed selection over `data`: returns how many keys
/// lie above `bracket.hi` and appends the keys inside the bracket to
/// `inside`, in index order.
pub fn scan_bracket(
    data: &[f32],
    key: KeyOf,
    bracket: SampleBracket,
    inside: &mut alloc::vec::Vec<u32>,
) -> u64 {
    scan_bracket_isa(
        crate::simd::selected(),
        data,
        key.sign_mask(),
        bracket.lo,
        bracket.hi,
        inside,
    )
}

crate::simd::multiversion!(fn scan_bracket_isa = scan_bracket_body(data: &[f32], sign_mask: u32, lo: u32, hi: u32, inside: &mut alloc::vec::Vec<u32>) -> u64);

/// Sixteen keys at a time: the comparisons vectorise into a bit mask, and
/// only the rare blocks with a key inside the bracket are visited again.
#[inline(always)]
fn scan_bracket_body(
    data: &[f32],
    sign_mask: u32,
    lo: u32,
    hi: u32,
    inside: &mut alloc::vec::Vec<u32>,
) -> u64 {
    let key = |x: f32| score_key(f32::from_bits(x.to_bits() & sign_mask));
    let mut above = 0u64;
    let blocks = data.chunks_exact(16);
    let rest = blocks.remainder();
    for block in blocks {
        let (mut up, mut hits) = (0u32, 0u32);
        for (i, &x) in block.iter().enumerate() {
            let k = key(x);
            up += u32::from(k > hi);
            hits |= u32::from(k >= lo && k <= hi) << i;
        }
        above += u64::from(up);
        while hits != 0 {
            inside.push(key(block[hits.trailing_zeros() as usize]));
            hits &= hits - 1;
        }
    }
    for &x in rest {
        let k = key(x);
        above += u64::from(k > hi);
        if k >= lo && k <= hi {
            inside.push(k);
        }
    }
    above
}

/// The keys of one chunk that lie inside a bracket: as gathered, or, when
/// a chunk gathers more than a sixteenth of its keys (many equal keys: the
/// differences of bf16 weights put whole percents of a tensor on one
/// value), as runs of equal keys, so that a chunk's equal keys cost one
/// entry. Which form a chunk takes changes the cost, never the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsideKeys {
    /// The keys, in no particular order.
    Keys(alloc::vec::Vec<u32>),
    /// `(key, how many)`, by increasing key.
    Runs(alloc::vec::Vec<(u32, u32)>),
}

impl InsideKeys {
    /// Scans `chunk` (at most `u32::MAX` elements): the count of keys above
    /// `bracket.hi`, and the keys inside the bracket.
    pub fn scan(chunk: &[f32], key: KeyOf, bracket: SampleBracket) -> (u64, InsideKeys) {
        let mut keys = alloc::vec::Vec::new();
        let above = scan_bracket(chunk, key, bracket, &mut keys);
        (above, InsideKeys::compact(keys, chunk.len()))
    }

    /// Runs of `keys` when they are more than a sixteenth of a chunk of
    /// `len` elements and at most half as many runs as keys remain.
    fn compact(mut keys: alloc::vec::Vec<u32>, len: usize) -> InsideKeys {
        if keys.len() <= len / 16 {
            return InsideKeys::Keys(keys);
        }
        keys.sort_unstable();
        let mut runs: alloc::vec::Vec<(u32, u32)> = alloc::vec::Vec::new();
        for &key in &keys {
            match runs.last_mut() {
                Some((last, count)) if *last == key => *count += 1,
                _ => {
                    if runs.len() >= keys.len() / 2 {
                        return InsideKeys::Keys(keys);
                    }
                    runs.push((key, 1));
                }
            }
        }
        InsideKeys::Runs(runs)
    }

    /// Entries held (keys or runs): the memory the chunk keeps.
    pub fn entries(&self) -> usize {
        match self {
            InsideKeys::Keys(keys) => keys.len(),
            InsideKeys::Runs(runs) => runs.len(),
        }
    }

    /// How many keys lie inside the bracket.
    pub fn count(&self) -> u64 {
        match self {
            InsideKeys::Keys(keys) => keys.len() as u64,
            InsideKeys::Runs(runs) => runs.iter().map(|&(_, c)| u64::from(c)).sum(),
        }
    }

    /// Calls `f(key, count)` for every key (count 1) or run.
    fn for_each_run(&self, mut f: impl FnMut(u32, u64)) {
        match self {
            InsideKeys::Keys(keys) => keys.iter().for_each(|&k| f(k, 1)),
            InsideKeys::Runs(runs) => runs.iter().for_each(|&(k, c)| f(k, u64::from(c))),
        }
    }

    /// The inside keys above `threshold`, and equal to it.
    pub fn above_and_equal(&self, threshold: u32) -> (u64, u64) {
        let (mut above, mut equal) = (0, 0);
        self.for_each_run(|key, count| {
            if key > threshold {
                above += count;
            } else if key == threshold {
                equal += count;
            }
        });
        (above, equal)
    }
}

/// Keys sampled by [`SampleBracket`]: enough that the bracket holds a few
/// percent of the data, few enough to sort in microseconds.
pub const SAMPLE_SIZE: usize = 1 << 14;

/// A range of keys `[lo, hi]` that holds the `m`-th largest of `n` keys
/// with high probability, read off a sorted sample: one counting pass then
/// finds the exact key among the few keys inside the range
/// ([`SampleBracket::resolve`]). When the sample misleads (rare), the
/// caller falls back to [`RadixSelect`]: the result is exact either way,
/// and depends only on the data, never on timing or thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleBracket {
    /// Smallest key of the range.
    pub lo: u32,
    /// Largest key of the range.
    pub hi: u32,
}

impl SampleBracket {
    /// The flat index of the `i`-th of `SAMPLE_SIZE` sample points of `n`
    /// elements: one point at a hashed offset in each of `SAMPLE_SIZE` equal
    /// strata, so that no stride of the data (a column, say) is favoured.
    pub fn sample_index(i: usize, n: usize) -> usize {
        let start = (i as u128 * n as u128 / SAMPLE_SIZE as u128) as usize;
        let end = ((i as u128 + 1) * n as u128 / SAMPLE_SIZE as u128) as usize;
        let mut h = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        start + (h % (end - start).max(1) as u64) as usize
    }

    /// The bracket of the `m`-th largest (1-based) of the `n` keys
    /// `key_at(0..n)`, from the keys at the sample points.
    pub fn for_rank(n: usize, m: usize, key_at: impl Fn(usize) -> u32) -> SampleBracket {
        let mut sample: alloc::vec::Vec<u32> = (0..SAMPLE_SIZE)
            .map(|i| key_at(SampleBracket::sample_index(i, n)))
            .collect();
        SampleBracket::from_sample(&mut sample, n, m)
    }

    /// The most keys a bracket may gather over `n` keys before the caller
    /// gives up on it (many equal keys): bounds the candidates' memory.
    pub fn candidate_cap(n: usize) -> usize {
        n / 16 + 4096
    }

    /// The bracket of the `m`-th largest (1-based) of `n` keys from the
    /// keys at the sample points; `sample` is reordered.
    pub fn from_sample(sample: &mut [u32], n: usize, m: usize) -> SampleBracket {
        sample.sort_unstable_by(|a, b| b.cmp(a));
        let s = sample.len();
        if s == 0 || n == 0 {
            return SampleBracket {
                lo: 0,
                hi: u32::MAX,
            };
        }
        let p = m as f64 / n as f64;
        let centre = p * s as f64;
        // Four standard deviations of the sample rank, and a margin for ties.
        let spread = 4.0 * libm::sqrt(s as f64 * p * (1.0 - p)) + 16.0;
        let upper = centre - spread;
        let lower = centre + spread;
        SampleBracket {
            hi: if upper < 0.0 {
                u32::MAX
            } else {
                sample[upper as usize]
            },
            lo: if lower >= (s - 1) as f64 {
                0
            } else {
                sample[lower as usize]
            },
        }
    }

    /// Whether `key` is inside the bracket.
    #[inline]
    pub fn holds(&self, key: u32) -> bool {
        key >= self.lo && key <= self.hi
    }

    /// The `m`-th largest key, given the count of keys above `hi` and what
    /// every part of the data (chunks, in any order) holds inside the
    /// bracket; `None` if the bracket missed it. Gathered keys alone are
    /// selected among directly; once runs of equal keys are present, a
    /// histogram of at most 2¹⁶ buckets over the bracket finds the bucket
    /// of the key, and the entries in that bucket alone are sorted.
    pub fn resolve_chunks<'a, I>(&self, above: u64, chunks: I, m: usize) -> Option<u32>
    where
        I: Iterator<Item = &'a InsideKeys> + Clone,
    {
        if chunks.clone().all(|c| matches!(c, InsideKeys::Keys(_))) {
            let mut candidates: alloc::vec::Vec<u32> = chunks
                .flat_map(|c| match c {
                    InsideKeys::Keys(keys) => keys.as_slice(),
                    InsideKeys::Runs(_) => &[],
                })
                .copied()
                .collect();
            return self.resolve(above, &mut candidates, m);
        }
        let total: u64 = chunks.clone().map(InsideKeys::count).sum();
        let m = m as u64;
        if above >= m || above + total < m {
            return None;
        }
        // Rank (1-based, from the top) of the key among the inside keys.
        let mut rank = m - above;
        // Buckets of 2^shift consecutive keys: the narrowest that cover the
        // bracket with at most 2^16 buckets (shift 16 always does).
        let shift = (0..16)
            .find(|&s| (self.hi >> s) - (self.lo >> s) < 1 << 16)
            .unwrap_or(16);
        let first = self.lo >> shift;
        let bucket = |key: u32| ((key >> shift) - first) as usize;
        let mut hist = alloc::vec![0u64; bucket(self.hi) + 1];
        for c in chunks.clone() {
            c.for_each_run(|key, count| hist[bucket(key)] += count);
        }
        let mut b = hist.len() - 1;
        while hist[b] < rank {
            rank -= hist[b];
            b -= 1;
        }
        let mut within = alloc::vec::Vec::new();
        for c in chunks {
            c.for_each_run(|key, count| {
                if bucket(key) == b {
                    within.push((key, count));
                }
            });
        }
        within.sort_unstable_by_key(|&(key, _)| core::cmp::Reverse(key));
        within.into_iter().find_map(|(key, count)| {
            if count >= rank {
                Some(key)
            } else {
                rank -= count;
                None
            }
        })
    }

    /// The `m`-th largest key, given the count of keys above `hi` and every
    /// key inside the bracket (reordered); `None` if the bracket missed it.
    pub fn resolve(&self, above: u64, candidates: &mut [u32], m: usize) -> Option<u32> {
        let m = m as u64;
        if above >= m || above + (candidates.len() as u64) < m {
            return None;
        }
        let rank = (m - above - 1) as usize;
        let (_, key, _) = candidates.select_nth_unstable_by(rank, |a, b| b.cmp(a));
        Some(*key)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn elect_count_follows_the_spec() {
        assert_eq!(elect_count(0.3, 10), 3, "0.3·10 must not round up to 4");
        assert_eq!(elect_count(0.2, 12), 3, "⌈2.4⌉");
        assert_eq!(elect_count(1.0, 7), 7);
        assert_eq!(elect_count(1e-9, 7), 1, "at least one");
        assert_eq!(elect_count(0.5, 0), 0);
    }

    #[test]
    fn kth_largest_on_a_hand_case() {
        let s = [0.5f32, 3.0, 0.0, 2.0, 2.0, f32::NAN, 1.0];
        assert_eq!(kth_largest(&s, 1), 3.0);
        assert_eq!(kth_largest(&s, 2), 2.0);
        assert_eq!(kth_largest(&s, 3), 2.0, "ties share a rank");
        assert_eq!(kth_largest(&s, 4), 1.0);
        assert_eq!(kth_largest(&s, 5), 0.5);
        assert_eq!(kth_largest(&s, 6), 0.0, "NaN and zero count as 0");
        let elected: Vec<bool> = s.iter().map(|&x| is_elected(x, 2.0)).collect();
        assert_eq!(elected, [false, true, false, true, true, false, false]);
    }

    #[test]
    fn a_sample_bracket_resolves_to_the_sorted_rank() {
        let mut state = 0x9e37_79b9u64;
        let keys: Vec<u32> = (0..200_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 44) as u32
            })
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for m in [1, 7, 40_000, 100_000, 199_999, 200_000] {
            let mut sample: Vec<u32> = (0..SAMPLE_SIZE)
                .map(|i| keys[SampleBracket::sample_index(i, keys.len())])
                .collect();
            let bracket = SampleBracket::from_sample(&mut sample, keys.len(), m);
            let above = keys.iter().filter(|&&k| k > bracket.hi).count() as u64;
            let mut inside: Vec<u32> = keys.iter().copied().filter(|&k| bracket.holds(k)).collect();
            assert!(inside.len() < keys.len() / 10, "the bracket is narrow");
            assert_eq!(
                bracket.resolve(above, &mut inside, m),
                Some(sorted[m - 1]),
                "m = {m}"
            );
        }
        // A bracket that misses says so.
        let miss = SampleBracket { lo: 10, hi: 20 };
        assert_eq!(miss.resolve(5, &mut [12, 15], 6), Some(15));
        assert_eq!(miss.resolve(5, &mut [15, 12], 7), Some(12));
        assert_eq!(miss.resolve(5, &mut [15, 12], 8), None, "below the bracket");
        assert_eq!(miss.resolve(5, &mut [15, 12], 5), None, "above the bracket");
    }

    #[test]
    fn sample_points_cover_every_stratum_once() {
        for n in [SAMPLE_SIZE, SAMPLE_SIZE + 1, 3 * SAMPLE_SIZE + 7, 1 << 22] {
            let points: Vec<usize> = (0..SAMPLE_SIZE)
                .map(|i| SampleBracket::sample_index(i, n))
                .collect();
            assert!(
                points.windows(2).all(|w| w[0] < w[1]),
                "increasing, distinct"
            );
            assert!(*points.last().unwrap() < n);
        }
    }

    #[test]
    fn kth_largest_matches_a_sort() {
        // A fixed pseudo-random sequence with many near-equal values.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let scores: Vec<f32> = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) % 1000) as f32 * 1e-3
            })
            .collect();
        let mut sorted = scores.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for m in [1, 2, 17, 999, 2500, 4999, 5000] {
            assert_eq!(kth_largest(&scores, m), sorted[m - 1], "m = {m}");
        }
    }

    /// Adversarial inputs for the selections: many equal keys, bf16
    /// differences, exact ties at the rank, NaN, negatives and zeros.
    pub(crate) fn adversarial(n: usize) -> Vec<(&'static str, Vec<f32>)> {
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bf16 = |x: f32| crate::dtype::bf16_to_f32(crate::dtype::f32_to_bf16(x));
        let mut uniform = || (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let noise: Vec<f32> = (0..n).map(|_| uniform()).collect();
        let half_equal: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 2 == 0 { 0.25 } else { x })
            .collect();
        // A bf16 weight nudged by less than its spacing, rounded again.
        let bf16_diff: Vec<f32> = noise
            .iter()
            .zip(noise.iter().rev())
            .map(|(&w, &d)| {
                let w = bf16(w * 0.04);
                bf16(w + d * 4e-4) - w
            })
            .collect();
        // One value repeated on 3% of the entries, right at the top fifth's edge.
        let mut sorted: Vec<f32> = noise.iter().map(|x| x.abs()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let edge = sorted[n / 5];
        let at_rank: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 33 == 0 { -edge } else { x })
            .collect();
        let hazards: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, &x)| match i % 7 {
                0 => f32::NAN,
                1 => 0.0,
                2 => -0.0,
                3 => -x.abs(),
                4 => f32::INFINITY,
                _ => bf16(x),
            })
            .collect();
        let few: Vec<f32> = noise.iter().map(|x| (x * 8.0).round()).collect();
        vec![
            ("all equal", vec![0.5; n]),
            ("all zero", vec![0.0; n]),
            ("half equal", half_equal),
            ("bf16 differences", bf16_diff),
            ("ties at the rank", at_rank),
            ("NaN, negative, zero", hazards),
            ("few values", few),
            ("noise", noise),
        ]
    }

    fn sorted_keys(data: &[f32], key: KeyOf) -> Vec<u32> {
        let mut keys: Vec<u32> = data.iter().map(|&x| key.of(x)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        keys
    }

    #[test]
    fn inside_keys_resolve_to_the_sorted_rank_however_the_data_is_split() {
        let n = 100_000;
        let mut runs_seen = 0;
        for (name, data) in adversarial(n) {
            for key in [KeyOf::Score, KeyOf::Magnitude] {
                let sorted = sorted_keys(&data, key);
                for m in [1, 17, n / 5, n / 2, n - 3, n] {
                    let bracket = SampleBracket::for_rank(n, m, |i| key.of(data[i]));
                    let mut found = Vec::new();
                    for chunk in [1usize << 16, 4096, 777, 100_000] {
                        let parts: Vec<(u64, InsideKeys)> = data
                            .chunks(chunk)
                            .map(|c| InsideKeys::scan(c, key, bracket))
                            .collect();
                        runs_seen += parts
                            .iter()
                            .filter(|p| matches!(p.1, InsideKeys::Runs(_)))
                            .count();
                        let above = parts.iter().map(|p| p.0).sum();
                        found.push(bracket.resolve_chunks(above, parts.iter().map(|p| &p.1), m));
                    }
                    assert!(
                        found.iter().all(|f| *f == found[0]),
                        "{name}, m = {m}: every split agrees"
                    );
                    if let Some(k) = found[0] {
                        assert_eq!(k, sorted[m - 1], "{name}, {key:?}, m = {m}");
                    }
                }
            }
        }
        assert!(runs_seen > 100, "equal keys are held as runs");
    }

    #[test]
    fn equal_keys_compact_into_runs_and_distinct_keys_stay_keys() {
        let all = InsideKeys::compact(vec![7; 1000], 1000);
        assert_eq!(all, InsideKeys::Runs(vec![(7, 1000)]));
        assert_eq!(all.count(), 1000);
        assert_eq!(all.above_and_equal(6), (1000, 0));
        assert_eq!(all.above_and_equal(7), (0, 1000));
        let two = InsideKeys::compact([vec![3; 300], vec![9; 200], vec![3; 100]].concat(), 1000);
        assert_eq!(two, InsideKeys::Runs(vec![(3, 400), (9, 200)]));
        assert_eq!(two.above_and_equal(3), (200, 400));
        // Few keys of a chunk, or keys that barely repeat, are kept as they are.
        assert_eq!(
            InsideKeys::compact(vec![5, 1, 5], 1000),
            InsideKeys::Keys(vec![5, 1, 5])
        );
        let distinct: Vec<u32> = (0..500).rev().collect();
        match InsideKeys::compact(distinct, 1000) {
            InsideKeys::Keys(keys) => assert_eq!(keys.len(), 500),
            runs => panic!("distinct keys became {runs:?}"),
        }
        // A mix of keys and runs selects like a sort of all of them.
        let bracket = SampleBracket { lo: 2, hi: 1 << 30 };
        let parts = [
            InsideKeys::Runs(vec![(3, 400), (9, 200)]),
            InsideKeys::Keys(vec![9, 1 << 30, 2, 3]),
        ];
        let mut all: Vec<u32> = [vec![3; 400], vec![9; 200], vec![9, 1 << 30, 2, 3]].concat();
        all.sort_unstable_by(|a, b| b.cmp(a));
        for m in 1..=all.len() + 5 {
            let expected = all.get(m - 1).copied();
            assert_eq!(
                bracket.resolve_chunks(0, parts.iter(), m),
                expected,
                "m = {m}"
            );
            let above = 5;
            let expected = (m > 5).then(|| all.get(m - 6).copied()).flatten();
            assert_eq!(bracket.resolve_chunks(above, parts.iter(), m), expected);
        }
    }
}
