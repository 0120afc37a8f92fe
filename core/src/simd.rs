//! Runtime dispatch of the element-wise kernels to the widest instruction
//! set the CPU offers.
//!
//! Every kernel is written once, as plain Rust on slices: that body *is*
//! the scalar reference. [`multiversion!`] compiles the same body again
//! with AVX2+FMA+F16C and with AVX-512 enabled, so the compiler vectorises
//! it, and picks one at run time. The bodies never use `mul_add` and never
//! reorder a sum, so a vectorised kernel gives the scalar kernel's bits
//! exactly (tested for every kernel and every instruction set the machine
//! has). Only the f16 conversions use intrinsics (F16C); they are exact
//! too. On aarch64, NEON is part of the baseline target, so the one body is
//! already vectorised there.
//!
//! `FLATMERGE_SIMD=scalar|avx2|avx512` caps the instruction set (with the
//! `std` feature), for comparisons and for ruling SIMD out when hunting a
//! problem; an unsupported choice falls back to the best supported one
//! below it.

use core::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The portable body, compiled for the baseline target (SSE2 on
    /// x86-64, NEON on aarch64): the reference.
    Scalar,
    /// x86-64 with AVX2, FMA, F16C and BMI2.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL/DQ (and everything of [`Isa::Avx2`]).
    Avx512,
}

impl Isa {
    /// Every level, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// The level's name (`scalar`, `avx2`, `avx512`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses [`Isa::as_str`]'s names.
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.as_str() == name)
    }

    /// Whether this CPU can run kernels compiled for this level.
    pub fn is_supported(self) -> bool {
        self <= widest_supported()
    }

    /// The levels this CPU supports, narrowest first.
    pub fn supported() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported())
    }

    /// This level if supported, else the widest supported level below it.
    pub fn or_supported(self) -> Isa {
        self.min(widest_supported())
    }
}

const UNKNOWN: u8 = u8::MAX;
static WIDEST: AtomicU8 = AtomicU8::new(UNKNOWN);
static SELECTED: AtomicU8 = AtomicU8::new(UNKNOWN);

fn from_index(index: u8) -> Isa {
    Isa::ALL[usize::from(index).min(Isa::ALL.len() - 1)]
}

/// The widest level the CPU supports (detected once).
fn widest_supported() -> Isa {
    match WIDEST.load(Ordering::Relaxed) {
        UNKNOWN => {
            let isa = detect();
            WIDEST.store(isa as u8, Ordering::Relaxed);
            isa
        }
        index => from_index(index),
    }
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn detect() -> Isa {
    let avx2 = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
        && std::is_x86_feature_detected!("bmi2");
    let avx512 = avx2
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq");
    if avx512 {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

/// Without `std` there is no run-time detection: what the build targets.
#[cfg(not(all(feature = "std", target_arch = "x86_64")))]
fn detect() -> Isa {
    let avx2 = cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        target_feature = "bmi2"
    ));
    let avx512 = avx2
        && cfg!(all(
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vl",
            target_feature = "avx512dq"
        ));
    if avx512 {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

/// The level the kernels use: the widest supported, capped by
/// `FLATMERGE_SIMD` (read once).
pub fn selected() -> Isa {
    match SELECTED.load(Ordering::Relaxed) {
        UNKNOWN => {
            let isa = requested().map_or(widest_supported(), Isa::or_supported);
            SELECTED.store(isa as u8, Ordering::Relaxed);
            isa
        }
        index => from_index(index),
    }
}

#[cfg(feature = "std")]
fn requested() -> Option<Isa> {
    Isa::parse(std::env::var("FLATMERGE_SIMD").ok()?.trim())
}

#[cfg(not(feature = "std"))]
fn requested() -> Option<Isa> {
    None
}

/// Defines `$name(isa, args…)` that runs the `#[inline(always)]` function
/// `$body(args…)` compiled for `isa` (an unsupported `isa` runs the widest
/// supported level below it).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident = $body:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$meta])*
        // The arity is the kernel body's; the level adds one.
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match isa.or_supported() {
                    // SAFETY: `or_supported` returns a level this CPU supports.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Isa::Scalar => {}
                }
            }
            let _ = isa;
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_levels_are_ordered() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.as_str()), Some(isa));
        }
        assert!(Isa::Scalar.is_supported());
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(selected().is_supported());
        assert_eq!(Isa::Scalar.or_supported(), Isa::Scalar);
        assert!(Isa::Avx512.or_supported().is_supported());
    }
}
