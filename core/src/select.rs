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
mod tests {
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
}
