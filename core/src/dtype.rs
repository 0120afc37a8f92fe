//! Element types of safetensors files and the conversions between the
//! floating-point storage types (F32, F16, BF16) and f32, in which all
//! arithmetic is done (SPEC preamble).
//!
//! Conversions are little-endian (the safetensors byte order) and work on
//! byte slices, because memory-mapped tensor data need not be aligned.

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
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
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

/// Decodes little-endian `bytes` of `dtype` (F32, F16 or BF16) into `out`.
///
/// # Panics
/// If `dtype` is not a float dtype or `bytes.len() != out.len() * dtype.size()`;
/// callers check both when they plan the merge.
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    assert!(dtype.is_float(), "decode_f32: {dtype} is not a float dtype");
    assert_eq!(bytes.len(), out.len() * dtype.size(), "decode_f32: length");
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => unreachable!(),
    }
}

/// Encodes `values` as little-endian `dtype` (F32, F16 or BF16) into `out`.
///
/// # Panics
/// If `dtype` is not a float dtype or `out.len() != values.len() * dtype.size()`.
pub fn encode_f32(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    assert!(dtype.is_float(), "encode_f32: {dtype} is not a float dtype");
    assert_eq!(out.len(), values.len() * dtype.size(), "encode_f32: length");
    match dtype {
        Dtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f32_to_f16(*v).to_le_bytes());
            }
        }
        _ => unreachable!(),
    }
}

/// The number of NaN or infinite elements in little-endian `bytes` of a
/// float `dtype`, and the index of the first, read from the bit patterns
/// (an all-ones exponent) without converting.
pub fn nonfinite(dtype: Dtype, bytes: &[u8]) -> (usize, Option<usize>) {
    let check = |i: usize, bad: bool, state: &mut (usize, Option<usize>)| {
        if bad {
            state.0 += 1;
            state.1.get_or_insert(i);
        }
    };
    let mut state = (0, None);
    match dtype {
        Dtype::F32 => {
            for (i, b) in bytes.chunks_exact(4).enumerate() {
                check(
                    i,
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000,
                    &mut state,
                );
            }
        }
        Dtype::BF16 => {
            for (i, b) in bytes.chunks_exact(2).enumerate() {
                check(
                    i,
                    u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80,
                    &mut state,
                );
            }
        }
        Dtype::F16 => {
            for (i, b) in bytes.chunks_exact(2).enumerate() {
                check(
                    i,
                    u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00,
                    &mut state,
                );
            }
        }
        _ => {}
    }
    state
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
