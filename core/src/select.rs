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
