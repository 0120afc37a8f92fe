//! Element types of safetensors files and the conversions between the
//! floating-point storage types (F32, F16, BF16) and f32, in which all
//! arithmetic is done (SPEC preamble).
//!
//! Conversions are little-endian (the safetensors byte order) and work on
//! byte slices, because memory-mapped tensor data need not be aligned.

use crate::simd::{multiversion, Isa};
use core::fmt;

/// An element type as safetensors names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, e4m3.
    F8E4M3,
    /// 8-bit float, e5m2.
    F8E5M2,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// IEEE half precision.
    F16,
    /// bfloat16: the upper half of an f32.
    BF16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// IEEE single precision.
    F32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// IEEE double precision.
    F64,
}

impl Dtype {
    /// Every dtype, in the order above.
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::U16,
        Dtype::I16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::U32,
        Dtype::I32,
        Dtype::F32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F64,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The name used in safetensors headers (`"BF16"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::F32 => "F32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F64 => "F64",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this crate does not know.
    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Parses a user-facing dtype name as mergekit and PyTorch spell them
    /// (`bfloat16`, `float16`, `float32`, `bf16`, `fp16`, `f32`, `F32`, …);
    /// only the three merge dtypes are accepted.
    pub fn parse_float(name: &str) -> Option<Dtype> {
        let lower = name.to_ascii_lowercase();
        match lower.trim_start_matches("torch.") {
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            "float16" | "half" | "f16" | "fp16" => Some(Dtype::F16),
            "float32" | "float" | "f32" | "fp32" => Some(Dtype::F32),
            _ => None,
        }
    }

    /// Whether tensors of this dtype can be merged (converted to and from f32).
    pub const fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, rounding to nearest with ties to even; NaN stays a
/// (quiet) NaN with its sign, infinities stay infinite.
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    let round = 0x7fff + ((bits >> 16) & 1);
    let rounded = (bits.wrapping_add(round) >> 16) as u16;
    let quiet_nan = ((bits >> 16) as u16) | 0x0040;
    // A select rather than an early return, so that loops vectorise.
    if value.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// f16 bits → f32 (exact).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// f32 → f16 bits, rounding to nearest with ties to even.
#[inline]
pub fn f32_to_f16(value: f32) -> u16 {
    half::f16::from_f32(value).to_bits()
}

/// Decodes little-endian `bytes` of `dtype` (F32, F16 or BF16) into `out`,
/// with the instruction set of [`crate::simd::selected`].
///
/// # Panics
/// If `dtype` is not a float dtype or `bytes.len() != out.len() * dtype.size()`;
/// callers check both when they plan the merge.
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    decode_f32_with(crate::simd::selected(), dtype, bytes, out)
}

/// [`decode_f32`] compiled for `isa` (the same bits for every `isa`).
pub fn decode_f32_with(isa: Isa, dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    assert!(dtype.is_float(), "decode_f32: {dtype} is not a float dtype");
    assert_eq!(bytes.len(), out.len() * dtype.size(), "decode_f32: length");
    match dtype {
        Dtype::F32 => decode_f32le(isa, bytes, out),
        Dtype::BF16 => decode_bf16(isa, bytes, out),
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if isa.or_supported() >= Isa::Avx2 {
                // SAFETY: AVX2 support implies F16C (see `Isa::Avx2`).
                return unsafe { f16c::decode(bytes, out) };
            }
            decode_f16_scalar(bytes, out)
        }
        _ => unreachable!(),
    }
}

/// Encodes `values` as little-endian `dtype` (F32, F16 or BF16) into `out`,
/// with the instruction set of [`crate::simd::selected`].
///
/// # Panics
/// If `dtype` is not a float dtype or `out.len() != values.len() * dtype.size()`.
pub fn encode_f32(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    encode_f32_with(crate::simd::selected(), dtype, values, out)
}

/// [`encode_f32`] compiled for `isa` (the same bits for every `isa`).
pub fn encode_f32_with(isa: Isa, dtype: Dtype, values: &[f32], out: &mut [u8]) {
    assert!(dtype.is_float(), "encode_f32: {dtype} is not a float dtype");
    assert_eq!(out.len(), values.len() * dtype.size(), "encode_f32: length");
    match dtype {
        Dtype::F32 => encode_f32le(isa, values, out),
        Dtype::BF16 => encode_bf16(isa, values, out),
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if isa.or_supported() >= Isa::Avx2 {
                // SAFETY: AVX2 support implies F16C (see `Isa::Avx2`).
                return unsafe { f16c::encode(values, out) };
            }
            encode_f16_scalar(values, out)
        }
        _ => unreachable!(),
    }
}

multiversion!(fn decode_f32le = decode_f32le_body(bytes: &[u8], out: &mut [f32]));
multiversion!(fn decode_bf16 = decode_bf16_body(bytes: &[u8], out: &mut [f32]));
multiversion!(fn encode_f32le = encode_f32le_body(values: &[f32], out: &mut [u8]));
multiversion!(fn encode_bf16 = encode_bf16_body(values: &[f32], out: &mut [u8]));

#[inline(always)]
fn decode_f32le_body(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

#[inline(always)]
fn decode_bf16_body(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

#[inline(always)]
fn encode_f32le_body(values: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

#[inline(always)]
fn encode_bf16_body(values: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

fn decode_f16_scalar(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn encode_f16_scalar(values: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
    }
}

/// f16 ↔ f32 eight at a time with F16C, which rounds to nearest even and
/// keeps subnormals, NaN signs and payloads as the `half` crate does.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use core::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX and F16C; `bytes.len() == 2 * out.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn decode(bytes: &[u8], out: &mut [f32]) {
        let whole = out.len() / 8 * 8;
        for (o, b) in out[..whole].chunks_exact_mut(8).zip(bytes.chunks_exact(16)) {
            // SAFETY: `b` holds 16 bytes and `o` 8 floats; unaligned access.
            unsafe {
                let halves = _mm_loadu_si128(b.as_ptr().cast());
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(halves));
            }
        }
        super::decode_f16_scalar(&bytes[whole * 2..], &mut out[whole..]);
    }

    /// # Safety
    /// The CPU must support AVX and F16C; `out.len() == 2 * values.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn encode(values: &[f32], out: &mut [u8]) {
        let whole = values.len() / 8 * 8;
        for (o, v) in out[..whole * 2]
            .chunks_exact_mut(16)
            .zip(values.chunks_exact(8))
        {
            // SAFETY: `v` holds 8 floats and `o` 16 bytes; unaligned access.
            unsafe {
                let floats = _mm256_loadu_ps(v.as_ptr());
                let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(floats);
                _mm_storeu_si128(o.as_mut_ptr().cast(), halves);
            }
        }
        super::encode_f16_scalar(&values[whole..], &mut out[whole * 2..]);
    }
}

/// The number of NaN or infinite elements in little-endian `bytes` of a
/// float `dtype`, and the index of the first, read from the bit patterns
/// (an all-ones exponent) without converting.
pub fn nonfinite(dtype: Dtype, bytes: &[u8]) -> (usize, Option<usize>) {
    let isa = crate::simd::selected();
    let (width, mask) = match dtype {
        Dtype::F32 => (4, 0x7f80_0000),
        Dtype::BF16 => (2, 0x7f80),
        Dtype::F16 => (2, 0x7c00),
        _ => return (0, None),
    };
    let count = if width == 4 {
        count_all_ones_32(isa, bytes, mask)
    } else {
        count_all_ones_16(isa, bytes, mask as u16)
    };
    // Finding the first is the rare path, taken only when there is one.
    let first = (count > 0).then(|| {
        bytes.chunks_exact(width).position(|b| {
            let bits = if width == 4 {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            } else {
                u32::from(u16::from_le_bytes([b[0], b[1]]))
            };
            bits & mask == mask
        })
    });
    (count, first.flatten())
}

multiversion!(fn count_all_ones_16 = count_all_ones_16_body(bytes: &[u8], mask: u16) -> usize);
multiversion!(fn count_all_ones_32 = count_all_ones_32_body(bytes: &[u8], mask: u32) -> usize);

/// Elements whose bits under `mask` (the exponent) are all ones.
#[inline(always)]
fn count_all_ones_16_body(bytes: &[u8], mask: u16) -> usize {
    bytes
        .chunks_exact(2)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]) & mask == mask))
        .sum()
}

#[inline(always)]
fn count_all_ones_32_body(bytes: &[u8], mask: u32) -> usize {
    bytes
        .chunks_exact(4)
        .map(|b| usize::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & mask == mask))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties to even → 1.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 lies between 1 + 2^-7 (odd mantissa) and 1 + 2^-6: ties to even → 1 + 2^-6.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        // Just above the tie rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_to_f32(0x3f81), 1.0078125);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
    }

    #[test]
    fn round_trips_are_exact_on_representable_values() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let values = [0.0f32, -0.0, 1.0, -2.5, 0.125, 1024.0, -0.0078125];
            let mut bytes = alloc::vec![0u8; values.len() * dtype.size()];
            encode_f32(dtype, &values, &mut bytes);
            let mut back = [0f32; 7];
            decode_f32(dtype, &bytes, &mut back);
            assert_eq!(back, values, "{dtype}");
        }
    }

    #[test]
    fn nonfinite_values_are_found_in_every_float_dtype() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let values = [
                1.0f32,
                f32::NAN,
                0.0,
                f32::INFINITY,
                -f32::INFINITY,
                65504.0,
            ];
            let mut bytes = alloc::vec![0u8; values.len() * dtype.size()];
            encode_f32(dtype, &values, &mut bytes);
            assert_eq!(nonfinite(dtype, &bytes), (3, Some(1)), "{dtype}");
            encode_f32(dtype, &[1.0, -2.0], &mut bytes[..2 * dtype.size()]);
            assert_eq!(
                nonfinite(dtype, &bytes[..2 * dtype.size()]),
                (0, None),
                "{dtype}"
            );
        }
    }

    /// Every f32 bit pattern class that rounding treats specially, plus a
    /// stride through all 2³² patterns.
    fn awkward_f32s() -> alloc::vec::Vec<f32> {
        let mut bits: alloc::vec::Vec<u32> = (0..=u32::MAX).step_by(65_537).collect();
        for base in [
            0u32,
            0x0000_8000,
            0x3f80_8000,
            0x477f_f000,
            0x7f7f_8000,
            0x387f_e000,
        ] {
            for delta in 0..4u32 {
                bits.push(base.wrapping_add(delta));
                bits.push(base.wrapping_sub(delta));
            }
        }
        bits.extend([
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0001,
            0xffa0_0000,
            0x7f80_0001,
            1,
            0x8000_0001,
        ]);
        bits.into_iter()
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect()
    }

    #[test]
    fn every_instruction_set_converts_to_the_scalar_bits() {
        let halves: alloc::vec::Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let floats = awkward_f32s();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let decoded_bytes: &[u8] = if dtype == Dtype::F32 {
                &halves[..halves.len() / 4 * 4]
            } else {
                &halves
            };
            let n = decoded_bytes.len() / dtype.size();
            let mut reference = alloc::vec![0f32; n];
            decode_f32_with(Isa::Scalar, dtype, decoded_bytes, &mut reference);
            let mut encoded_reference = alloc::vec![0u8; floats.len() * dtype.size()];
            encode_f32_with(Isa::Scalar, dtype, &floats, &mut encoded_reference);
            for isa in Isa::supported() {
                // Odd lengths and offsets exercise the vector tails.
                for cut in [0, 1, 7] {
                    let mut out = alloc::vec![0f32; n - cut];
                    decode_f32_with(isa, dtype, &decoded_bytes[cut * dtype.size()..], &mut out);
                    let same = out
                        .iter()
                        .zip(&reference[cut..])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "decode {dtype} {isa:?} cut {cut}");
                    let mut bytes = alloc::vec![0u8; (floats.len() - cut) * dtype.size()];
                    encode_f32_with(isa, dtype, &floats[cut..], &mut bytes);
                    assert!(
                        bytes == encoded_reference[cut * dtype.size()..],
                        "encode {dtype} {isa:?} cut {cut}"
                    );
                }
            }
        }
        // The scalar f16 path is the `half` crate's; F16C must agree with it on every pattern.
        let values: alloc::vec::Vec<f32> = (0..=u16::MAX).map(f16_to_f32).collect();
        for isa in Isa::supported() {
            let mut back = alloc::vec![0u8; values.len() * 2];
            encode_f32_with(isa, Dtype::F16, &values, &mut back);
            for (bits, b) in (0..=u16::MAX).zip(back.chunks_exact(2)) {
                let back = u16::from_le_bytes([b[0], b[1]]);
                // NaNs come back quiet, with sign and payload.
                let expected = if values[bits as usize].is_nan() {
                    bits | 0x0200
                } else {
                    bits
                };
                assert_eq!(back, expected, "{isa:?} {bits:#06x}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for dtype in Dtype::ALL {
            assert_eq!(Dtype::parse(dtype.as_str()), Some(dtype));
        }
        assert_eq!(Dtype::parse("F4"), None);
        assert_eq!(Dtype::parse_float("bfloat16"), Some(Dtype::BF16));
        assert_eq!(Dtype::parse_float("torch.float16"), Some(Dtype::F16));
        assert_eq!(Dtype::parse_float("int8"), None);
    }
}
