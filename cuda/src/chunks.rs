//! How a tensor is cut into pieces that fit in device memory: host code
//! only, so it is tested on machines without a GPU.

use crate::{Error, ErrorKind};
use std::ops::Range;

/// What one device call needs: `fixed` bytes for the whole call (a
/// projection direction, counters, a shared operand) and `per_unit` bytes
/// for each unit (a row of a weight, an element of a bias, a row of a
/// correlation) that is on the device at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes that do not depend on the chunk size.
    pub fixed: usize,
    /// Bytes per unit in a chunk.
    pub per_unit: usize,
}

impl Footprint {
    /// The bytes a chunk of `units` units needs, or `None` on overflow.
    pub fn bytes(&self, units: usize) -> Option<usize> {
        self.per_unit.checked_mul(units)?.checked_add(self.fixed)
    }
}

/// The device memory a call may use: the caller's limit, and never more
/// than `free` less a reserve (the driver, other streams and the
/// allocator's rounding need some; a tenth, at least 64 MiB, is a margin
/// that keeps an allocation from failing on a full device).
pub fn budget(free: usize, limit: Option<usize>) -> usize {
    let reserve = (free / 10).max(64 << 20);
    let available = free.saturating_sub(reserve);
    limit.map_or(available, |l| l.min(available))
}

/// Cuts `units` units into consecutive ranges of equal size (the last may
/// be shorter), each as large as `budget` allows for `footprint` and at
/// most `max_units` long (a launch's grid bounds some kernels). Every unit
/// is in exactly one range, in order. No units: no ranges.
///
/// # Errors
/// [`ErrorKind::TooLarge`] when not even one unit fits in `budget`.
pub fn plan(
    units: usize,
    footprint: Footprint,
    budget: usize,
    max_units: usize,
) -> Result<Vec<Range<usize>>, Error> {
    if units == 0 {
        return Ok(Vec::new());
    }
    footprint.bytes(1).filter(|&b| b <= budget).ok_or_else(|| {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "one unit needs {} bytes of device memory ({} fixed + {} per unit) but {budget} are allowed",
                footprint.fixed.saturating_add(footprint.per_unit),
                footprint.fixed,
                footprint.per_unit
            ),
        )
    })?;
    let per_chunk = match footprint.per_unit {
        0 => units,
        per_unit => (budget - footprint.fixed) / per_unit,
    }
    .clamp(1, units.min(max_units.max(1)));
    Ok((0..units)
        .step_by(per_chunk)
        .map(|start| start..(start + per_chunk).min(units))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(units: usize, footprint: Footprint, budget: usize) -> Vec<Range<usize>> {
        let chunks = plan(units, footprint, budget, usize::MAX).unwrap();
        let mut next = 0;
        for c in &chunks {
            assert_eq!(c.start, next, "consecutive");
            assert!(!c.is_empty(), "no empty chunk");
            assert!(footprint.bytes(c.len()).unwrap() <= budget, "{c:?} fits");
            next = c.end;
        }
        assert_eq!(next, units, "every unit covered");
        chunks
    }

    #[test]
    fn everything_in_one_chunk_when_it_fits() {
        let f = Footprint {
            fixed: 100,
            per_unit: 10,
        };
        assert_eq!(check(50, f, 600), vec![0..50]);
        assert_eq!(check(50, f, 10_000), vec![0..50]);
    }

    #[test]
    fn chunks_are_as_large_as_the_budget_allows() {
        let f = Footprint {
            fixed: 100,
            per_unit: 10,
        };
        // (599 − 100) / 10 = 49 units per chunk.
        assert_eq!(check(50, f, 599), [0..49, 49..50]);
        assert_eq!(
            check(7, f, 110),
            (0..7).map(|i| i..i + 1).collect::<Vec<_>>()
        );
        assert_eq!(check(10, f, 135), [0..3, 3..6, 6..9, 9..10]);
    }

    #[test]
    fn nothing_to_do_gives_no_chunk() {
        let f = Footprint {
            fixed: 1 << 40,
            per_unit: 1,
        };
        assert!(plan(0, f, 0, usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn one_unit_that_does_not_fit_is_an_error() {
        let f = Footprint {
            fixed: 100,
            per_unit: 10,
        };
        let e = plan(5, f, 109, usize::MAX).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert!(e.message.contains("110 bytes"), "{e}");
        let huge = Footprint {
            fixed: usize::MAX,
            per_unit: 1,
        };
        assert_eq!(
            plan(1, huge, usize::MAX, usize::MAX).unwrap_err().kind,
            ErrorKind::TooLarge
        );
    }

    #[test]
    fn the_unit_cap_splits_further() {
        let f = Footprint {
            fixed: 0,
            per_unit: 1,
        };
        assert_eq!(plan(10, f, 1000, 4).unwrap(), [0..4, 4..8, 8..10]);
        assert_eq!(
            plan(3, f, 1000, 0).unwrap(),
            [0..1, 1..2, 2..3],
            "a zero cap is one"
        );
    }

    #[test]
    fn units_without_size_take_one_chunk() {
        let f = Footprint {
            fixed: 8,
            per_unit: 0,
        };
        assert_eq!(check(1000, f, 8), vec![0..1000]);
    }

    #[test]
    fn budget_keeps_a_reserve_and_honours_the_limit() {
        let gib = 1usize << 30;
        assert_eq!(budget(10 * gib, None), 9 * gib);
        assert_eq!(budget(10 * gib, Some(gib)), gib);
        assert_eq!(budget(10 * gib, Some(20 * gib)), 9 * gib);
        // Below 640 MiB the reserve is 64 MiB; nothing left is zero, not an underflow.
        assert_eq!(budget(100 << 20, None), 36 << 20);
        assert_eq!(budget(10 << 20, None), 0);
    }

    #[test]
    fn random_plans_cover_and_fit() {
        // A small deterministic generator: the planner has no randomness of its own.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % m as u64) as usize
        };
        for _ in 0..2000 {
            let f = Footprint {
                fixed: next(1000),
                per_unit: next(64),
            };
            let units = next(500);
            let budget = f.fixed + f.per_unit + next(5000);
            let chunks = check(units, f, budget);
            if f.per_unit > 0 && units > 0 {
                // As few chunks as the budget allows.
                let per = ((budget - f.fixed) / f.per_unit).clamp(1, units);
                assert_eq!(chunks.len(), units.div_ceil(per));
            }
        }
    }
}
