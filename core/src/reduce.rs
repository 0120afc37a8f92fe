//! Deterministic reductions (SPEC preamble: sums over many terms use a
//! fixed-shape reduction whose result does not depend on the thread count).
//!
//! Products of two f32 are exact in f64 (24 + 24 significant bits ≤ 53), so
//! these dot products accumulate in f64 over four interleaved lanes, combined
//! as `(l0 + l1) + (l2 + l3)`. The order is fixed by the data length alone;
//! a SIMD kernel that keeps the same four lanes gives the same bits, with or
//! without fused multiply-add (the product being exact, FMA rounds the same).

/// `Σ a[i]·b[i]` in f64, in the fixed four-lane order described above.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: slices differ in length");
    let mut lanes = [0f64; 4];
    let mut a4 = a.chunks_exact(4);
    let mut b4 = b.chunks_exact(4);
    for (x, y) in (&mut a4).zip(&mut b4) {
        for lane in 0..4 {
            lanes[lane] += x[lane] as f64 * y[lane] as f64;
        }
    }
    for (lane, (x, y)) in a4.remainder().iter().zip(b4.remainder()).enumerate() {
        lanes[lane] += *x as f64 * *y as f64;
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

/// `Σ a[i]²` in f64, in the order of [`dot`].
pub fn sum_squares(a: &[f32]) -> f64 {
    dot(a, a)
}

/// `Σ a[i]` in f64, in the order of [`dot`] (with every `b[i] = 1`).
pub fn sum(a: &[f32]) -> f64 {
    let mut lanes = [0f64; 4];
    let mut a4 = a.chunks_exact(4);
    for x in &mut a4 {
        for lane in 0..4 {
            lanes[lane] += x[lane] as f64;
        }
    }
    for (lane, x) in a4.remainder().iter().enumerate() {
        lanes[lane] += *x as f64;
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_of_small_vectors() {
        assert_eq!(dot(&[], &[]), 0.0);
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
        assert_eq!(sum(&[1.0, 2.0, 3.0, 4.0, 5.0]), 15.0);
    }

    #[test]
    fn dot_keeps_what_f32_accumulation_loses() {
        // 1 + 1e-8·n is not representable step by step in f32 but is in f64.
        let n = 10_000;
        let mut a = alloc::vec![1e-8f32; n];
        a[0] = 1.0;
        let ones = alloc::vec![1.0f32; n];
        let expected = 1.0 + 1e-8f32 as f64 * (n - 1) as f64;
        assert!((dot(&a, &ones) - expected).abs() < 1e-12);
    }
}
