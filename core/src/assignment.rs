//! Rectangular linear assignment (SPEC §2.3): an exact one-to-one matching
//! of rows to columns that minimises (or maximises) the summed cost, on a
//! dense row-major `f64` matrix.
//!
//! - [`Method::Exact`]: Jonker–Volgenant's shortest augmenting path in the
//!   formulation of Crouse (2016) — the algorithm behind SciPy's
//!   `linear_sum_assignment`, without JV's initialisation heuristics —
//!   O(n²·m) for `n = min(rows, cols)`, `m = max(rows, cols)`. One Dijkstra
//!   search per row of the smaller side, each step scanning one contiguous
//!   row of the cost matrix (AVX2 where the CPU has it).
//! - [`Method::Greedy`]: repeatedly take the globally best remaining pair.
//!   O(rows·cols·log(rows·cols)) in the worst case, about one pass over the
//!   matrix on well-separated inputs (see [`Method::Greedy`]).
//!
//! Rectangular problems match `min(rows, cols)` pairs: when `rows > cols`
//! some rows stay unmatched, when `rows < cols` some columns are dropped
//! (the exact solver transposes a tall matrix internally, into its
//! [`Workspace`]). Infinite costs forbid a pair (`+∞` when minimising, `−∞`
//! when maximising); an infinity in the other direction makes the optimum
//! unbounded and is an error, as is any NaN. Finite costs should stay far
//! from `f64::MAX` (below about 1e300 in magnitude): the search adds and
//! subtracts a few of them, and an overflow would read as a forbidden pair.
//!
//! Ties are broken deterministically, see [`Method`]: the result depends only
//! on the input bits, never on timing or allocation.
//!
//! Scratch memory is explicit: [`solve_with`] takes a [`Workspace`] that a
//! caller solving many problems keeps and reuses.

use alloc::collections::BinaryHeap;
use alloc::vec::Vec;
use core::cmp::Reverse;
use core::fmt;

/// Which algorithm [`solve_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// The optimum, by shortest augmenting paths (Jonker–Volgenant, in
    /// Crouse's formulation), O(n²·m) for `n = min(rows, cols)`,
    /// `m = max(rows, cols)`; O(n + m) scratch (plus a transposed copy of
    /// the matrix when `rows > cols`).
    ///
    /// Among columns at the same tentative distance the search takes a free
    /// column first (it ends the search), then the lowest index. When several
    /// assignments are optimal, which one is returned is fixed by these rules
    /// but not otherwise specified; the total is the optimum either way.
    #[default]
    Exact,
    /// Repeatedly take the globally best remaining pair (lowest cost, or
    /// highest when maximising); ties go to the lowest row, then the lowest
    /// column. Pairs with a forbidden (infinite) cost are never taken, so a
    /// row can stay unmatched even where a complete matching exists; greedy
    /// never reports [`AssignmentError::Infeasible`].
    ///
    /// Cost: a first pass finds every row's best column; a heap orders the
    /// rows by their current candidate. When a row's candidate has been
    /// taken, it moves to its next one, and when its list runs out another
    /// pass over its row collects the next block of free columns, each
    /// block twice as long as the last. In the worst case (every row
    /// preferring the same columns) that is O(rows·cols·log(rows·cols))
    /// time and O(rows·cols) scratch; when the best pairs are distinct (a
    /// planted permutation) it is about one pass over the matrix with
    /// O(rows) scratch.
    Greedy,
}

/// Why a problem has no solution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AssignmentError {
    /// `costs.len()` is not `rows × cols` (or that product overflows, or
    /// both sides have 2³² − 1 entries or more).
    Shape {
        /// The length of the cost slice.
        len: usize,
        /// The number of rows asked for.
        rows: usize,
        /// The number of columns asked for.
        cols: usize,
    },
    /// A cost is NaN.
    NotANumber {
        /// Row of the first NaN (row-major order).
        row: usize,
        /// Its column.
        col: usize,
    },
    /// An infinite cost in the favoured direction (`−∞` when minimising,
    /// `+∞` when maximising): the optimum would be unbounded.
    Unbounded {
        /// Row of the first such entry (row-major order).
        row: usize,
        /// Its column.
        col: usize,
    },
    /// The forbidden pairs (`+∞` when minimising, `−∞` when maximising)
    /// leave no assignment that matches `min(rows, cols)` pairs.
    Infeasible,
}

impl fmt::Display for AssignmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AssignmentError::Shape { len, rows, cols } => write!(
                f,
                "assignment: {len} costs do not form a {rows} x {cols} matrix"
            ),
            AssignmentError::NotANumber { row, col } => {
                write!(f, "assignment: the cost at row {row}, column {col} is NaN")
            }
            AssignmentError::Unbounded { row, col } => write!(
                f,
                "assignment: the cost at row {row}, column {col} is infinite in the \
                 optimised direction (the optimum is unbounded)"
            ),
            AssignmentError::Infeasible => write!(
                f,
                "assignment: the forbidden (infinite) costs leave no complete assignment"
            ),
        }
    }
}

impl core::error::Error for AssignmentError {}

/// A solution: the column of each row, and the summed cost of the pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// For each row, the column it is matched with, or `None` (rows beyond
    /// the number of columns, or — greedy only — rows left without an
    /// allowed pair).
    pub row_to_col: Vec<Option<usize>>,
    /// The sum of the costs of the matched pairs (in row order, compensated),
    /// in the caller's sign: the maximum when maximising.
    pub total: f64,
}

impl Assignment {
    /// The matched `(row, col)` pairs, in row order.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.row_to_col
            .iter()
            .enumerate()
            .filter_map(|(r, c)| c.map(|c| (r, c)))
    }

    /// How many pairs are matched.
    pub fn matched(&self) -> usize {
        self.row_to_col.iter().filter(|c| c.is_some()).count()
    }

    /// For each of `cols` columns, the row matched with it, or `None`.
    pub fn col_to_row(&self, cols: usize) -> Vec<Option<usize>> {
        let mut out = alloc::vec![None; cols];
        for (r, c) in self.pairs() {
            out[c] = Some(r);
        }
        out
    }
}

/// Scratch memory for [`solve_with`]. It grows to the largest problem it
/// has seen and keeps its capacity; reuse one per thread. Solving a problem
/// no larger than one already solved then allocates only the returned
/// [`Assignment`] (greedy: unless its candidate lists grow longer than
/// before).
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    /// The transposed matrix when `rows > cols` (exact).
    transposed: Vec<f64>,
    /// Row duals (exact).
    u: Vec<f64>,
    /// Column duals (exact); `−∞` marks a column already scanned in the
    /// current search.
    v: Vec<f64>,
    /// Tentative shortest-path distances of the columns (exact).
    dist: Vec<f64>,
    /// The row through which each column was reached (exact).
    path: Vec<u32>,
    /// The row matched with each column, `NONE` if free (exact).
    row4col: Vec<u32>,
    /// The column matched with each row, `usize::MAX` if free (exact).
    col4row: Vec<usize>,
    /// One bit per column, set while it is free (exact).
    free: Vec<u64>,
    /// Rows entered in the current search, with the distance at entry.
    tree_rows: Vec<(u32, f64)>,
    /// Columns scanned in the current search: index, distance, saved dual.
    tree_cols: Vec<(usize, f64, f64)>,
    /// Greedy: candidate columns, per-row blocks.
    arena: Vec<usize>,
    /// Greedy: per row, the block `[start, end)` in `arena` and the cursor.
    blocks: Vec<(usize, usize, usize)>,
    /// Greedy: columns taken.
    taken: Vec<bool>,
    /// Greedy: eligible `(key, col)` pairs for a large refill.
    eligible: Vec<(u64, usize)>,
    /// Greedy: the heap's storage between calls.
    heap: Vec<Reverse<(u64, usize)>>,
}

impl Workspace {
    /// An empty workspace; it grows on first use.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Marks a free column in `row4col`.
const NONE: u32 = u32::MAX;

/// The exact optimum of a `rows × cols` row-major cost matrix (see
/// [`Method::Exact`]), with a fresh [`Workspace`].
///
/// Minimises `Σ costs[r·cols + c]` over the matched pairs, or maximises it
/// when `maximize`; matches `min(rows, cols)` pairs. An empty matrix (no
/// rows or no columns) gives an empty assignment with total 0.
pub fn solve(
    costs: &[f64],
    rows: usize,
    cols: usize,
    maximize: bool,
) -> Result<Assignment, AssignmentError> {
    solve_with(
        costs,
        rows,
        cols,
        maximize,
        Method::Exact,
        &mut Workspace::new(),
    )
}

/// The greedy assignment (see [`Method::Greedy`]), with a fresh
/// [`Workspace`].
pub fn greedy(
    costs: &[f64],
    rows: usize,
    cols: usize,
    maximize: bool,
) -> Result<Assignment, AssignmentError> {
    solve_with(
        costs,
        rows,
        cols,
        maximize,
        Method::Greedy,
        &mut Workspace::new(),
    )
}

/// Solves a `rows × cols` row-major problem with `method`, using `ws` for
/// scratch memory.
///
/// Errors: [`AssignmentError::Shape`] when `costs.len() != rows·cols`,
/// [`AssignmentError::NotANumber`] for a NaN, [`AssignmentError::Unbounded`]
/// for `−∞` (minimising) or `+∞` (maximising), and — exact only —
/// [`AssignmentError::Infeasible`] when the forbidden pairs leave no
/// assignment of `min(rows, cols)` pairs.
pub fn solve_with(
    costs: &[f64],
    rows: usize,
    cols: usize,
    maximize: bool,
    method: Method,
    ws: &mut Workspace,
) -> Result<Assignment, AssignmentError> {
    let shape = AssignmentError::Shape {
        len: costs.len(),
        rows,
        cols,
    };
    if rows.checked_mul(cols) != Some(costs.len()) {
        return Err(shape);
    }
    validate(costs, cols, maximize)?;
    let mut row_to_col = alloc::vec![None; rows];
    if rows == 0 || cols == 0 {
        return Ok(Assignment {
            row_to_col,
            total: 0.0,
        });
    }
    // Row indices are kept as u32 in the search; the smaller side of any
    // matrix that fits in memory is far below that.
    if rows.min(cols) >= NONE as usize {
        return Err(shape);
    }
    match method {
        Method::Exact => {
            if rows <= cols {
                exact(costs, rows, cols, maximize, ws)?;
                for (r, &c) in ws.col4row[..rows].iter().enumerate() {
                    row_to_col[r] = Some(c);
                }
            } else {
                let mut t = core::mem::take(&mut ws.transposed);
                t.clear();
                t.resize(costs.len(), 0.0);
                transpose(costs, rows, cols, &mut t);
                let solved = exact(&t, cols, rows, maximize, ws);
                ws.transposed = t;
                solved?;
                for (c, &r) in ws.col4row[..cols].iter().enumerate() {
                    row_to_col[r] = Some(c);
                }
            }
        }
        Method::Greedy => greedy_into(costs, rows, cols, maximize, ws, &mut row_to_col),
    }
    let total = total_cost(costs, cols, &row_to_col);
    Ok(Assignment { row_to_col, total })
}

/// Checks every cost: no NaN, no infinity in the optimised direction.
fn validate(costs: &[f64], cols: usize, maximize: bool) -> Result<(), AssignmentError> {
    let unbounded = if maximize {
        f64::INFINITY
    } else {
        f64::NEG_INFINITY
    };
    // A branch-free pass first (the common case: nothing wrong), then a
    // second one to name the entry.
    let bad = costs.chunks(1024).any(|c| {
        c.iter()
            .fold(false, |b, &x| b | x.is_nan() | (x == unbounded))
    });
    if !bad {
        return Ok(());
    }
    let k = costs
        .iter()
        .position(|&x| x.is_nan() || x == unbounded)
        .unwrap_or(0);
    let (row, col) = (k / cols, k % cols);
    if costs[k].is_nan() {
        Err(AssignmentError::NotANumber { row, col })
    } else {
        Err(AssignmentError::Unbounded { row, col })
    }
}

/// `Σ costs[r, c]` over the matched pairs in row order, Neumaier-compensated.
fn total_cost(costs: &[f64], cols: usize, row_to_col: &[Option<usize>]) -> f64 {
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for (r, c) in row_to_col.iter().enumerate() {
        if let Some(c) = *c {
            let x = costs[r * cols + c];
            let t = sum + x;
            if libm::fabs(sum) >= libm::fabs(x) {
                comp += (sum - t) + x;
            } else {
                comp += (x - t) + sum;
            }
            sum = t;
        }
    }
    sum + comp
}

/// `out[c·rows + r] = a[r·cols + c]`, in cache-sized tiles.
fn transpose(a: &[f64], rows: usize, cols: usize, out: &mut [f64]) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for r in r0..r1 {
                let row = &a[r * cols + c0..r * cols + c1];
                for (k, &x) in row.iter().enumerate() {
                    out[(c0 + k) * rows + r] = x;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ exact

/// Shortest augmenting paths on `n × m`, `n ≤ m`; leaves the column of each
/// row in `ws.col4row[..n]`.
fn exact(
    costs: &[f64],
    n: usize,
    m: usize,
    maximize: bool,
    ws: &mut Workspace,
) -> Result<(), AssignmentError> {
    debug_assert!(n <= m && costs.len() == n * m);
    reset(&mut ws.u, n, 0.0);
    reset(&mut ws.v, m, 0.0);
    reset(&mut ws.dist, m, f64::INFINITY);
    reset(&mut ws.path, m, NONE);
    reset(&mut ws.row4col, m, NONE);
    reset(&mut ws.col4row, n, usize::MAX);
    reset(&mut ws.free, m.div_ceil(64), u64::MAX);
    ws.tree_rows.clear();
    ws.tree_rows.reserve(n);
    ws.tree_cols.clear();
    ws.tree_cols.reserve(m);
    let scan = if maximize {
        pick_scan::<true>()
    } else {
        pick_scan::<false>()
    };
    for row in 0..n {
        augment(costs, m, row, scan, ws)?;
    }
    Ok(())
}

fn reset<T: Copy>(v: &mut Vec<T>, len: usize, value: T) {
    v.clear();
    v.resize(len, value);
}

/// One Dijkstra search from the free row `start` to the nearest free
/// column in reduced costs, then the dual update and the augmentation
/// (Crouse 2016, Algorithm 1 with the duals of JV).
///
/// Scanned columns get `v = −∞` for the duration of the search, so that
/// their reduced cost is `+∞`: the contiguous scan needs no membership
/// test, and rounding can never re-open a settled column. Their distance is
/// set to `+∞` so that the minimum skips them; both are restored from
/// `tree_cols` at the end.
fn augment(
    costs: &[f64],
    m: usize,
    start: usize,
    scan: ScanFn,
    ws: &mut Workspace,
) -> Result<(), AssignmentError> {
    let Workspace {
        u,
        v,
        dist,
        path,
        row4col,
        col4row,
        free,
        tree_rows,
        tree_cols,
        ..
    } = ws;
    tree_rows.clear();
    tree_cols.clear();
    let mut min_val = 0.0f64;
    let mut i = start;
    let sink = loop {
        let row = &costs[i * m..(i + 1) * m];
        let base = min_val - u[i];
        let mut cols = Columns {
            v,
            dist,
            path,
            free,
        };
        let (lowest, j) = scan(row, base, i as u32, &mut cols);
        if lowest == f64::INFINITY {
            // No reachable column: restore the duals and give up.
            for &(j, _, vj) in tree_cols.iter() {
                v[j] = vj;
            }
            return Err(AssignmentError::Infeasible);
        }
        min_val = lowest;
        tree_cols.push((j, lowest, v[j]));
        v[j] = f64::NEG_INFINITY;
        dist[j] = f64::INFINITY;
        let owner = row4col[j];
        if owner == NONE {
            break j;
        }
        i = owner as usize;
        tree_rows.push((owner, lowest));
    };
    // Duals: u_start += δ; u_i += δ − d(col of i) for the other tree rows;
    // v_j −= δ − d_j for the scanned columns. Reduced costs stay ≥ 0 and
    // are 0 along the matching.
    u[start] += min_val;
    for &(r, d) in tree_rows.iter() {
        u[r as usize] += min_val - d;
    }
    for &(j, d, vj) in tree_cols.iter() {
        v[j] = vj - (min_val - d);
    }
    // Distances back to +∞ for the next search (scanned ones already are).
    dist.fill(f64::INFINITY);
    // Augment along the path back to `start`; the sink is the one column
    // that stops being free.
    free[sink / 64] &= !(1u64 << (sink % 64));
    let mut j = sink;
    loop {
        let r = path[j];
        row4col[j] = r;
        let prev = core::mem::replace(&mut col4row[r as usize], j);
        if r as usize == start {
            break;
        }
        j = prev;
    }
    Ok(())
}

/// The inner loop, one instruction set per implementation: relax every
/// column from row `i` — tentative distance `d_j ← min(d_j, base ± c_j −
/// v_j)`, with `path_j ← i` when it improves (`+` minimising, `−`
/// maximising) — and return the lowest distance with its column.
///
/// Among equal distances a free column (bit set in `free`) wins, then the
/// lowest index: the key `(d, taken, j)` is compared exactly, so every
/// implementation returns the same column and the solver the same bits.
type ScanFn = fn(&[f64], f64, u32, &mut Columns<'_>) -> (f64, usize);

/// The per-column state a [`ScanFn`] reads and updates; every slice holds
/// at least as many entries as the cost row (`free`: bits).
struct Columns<'a> {
    /// Column duals, `−∞` for the columns already scanned.
    v: &'a [f64],
    /// Tentative distances.
    dist: &'a mut [f64],
    /// The row each column was last improved from.
    path: &'a mut [u32],
    /// One bit per column, set while it is free.
    free: &'a [u64],
}

/// The running minimum of the key `(d, taken, j)` of [`ScanFn`].
#[derive(Clone, Copy)]
struct Best {
    d: f64,
    free: bool,
    j: usize,
}

impl Best {
    const NONE: Best = Best {
        d: f64::INFINITY,
        free: false,
        j: usize::MAX,
    };

    #[inline(always)]
    fn offer(&mut self, d: f64, free: bool, j: usize) {
        let wins = d < self.d
            || (d == self.d && ((free && !self.free) || (free == self.free && j < self.j)));
        if wins {
            *self = Best { d, free, j };
        }
    }
}

#[inline(always)]
fn is_free(free: &[u64], j: usize) -> bool {
    (free[j / 64] >> (j % 64)) & 1 == 1
}

/// [`ScanFn`] for columns `from..`, continuing `best`: the portable
/// implementation, and the tail of the vector ones.
#[inline(always)]
fn scan_from<const MAX: bool>(
    from: usize,
    mut best: Best,
    row: &[f64],
    base: f64,
    i: u32,
    cols: &mut Columns<'_>,
) -> (f64, usize) {
    let m = row.len();
    let (v, dist, path) = (&cols.v[..m], &mut cols.dist[..m], &mut cols.path[..m]);
    let free = cols.free;
    for j in from..m {
        let cost = if MAX { -row[j] } else { row[j] };
        let r = base + cost - v[j];
        if r < dist[j] {
            dist[j] = r;
            path[j] = i;
        }
        let d = dist[j];
        if d <= best.d {
            best.offer(d, is_free(free, j), j);
        }
    }
    (best.d, best.j)
}

fn scan_portable<const MAX: bool>(
    row: &[f64],
    base: f64,
    i: u32,
    cols: &mut Columns<'_>,
) -> (f64, usize) {
    scan_from::<MAX>(0, Best::NONE, row, base, i, cols)
}

/// The widest [`ScanFn`] this CPU runs: AVX2 where the build enables it or
/// (with the `std` feature) the CPU has it, the portable loop otherwise.
fn pick_scan<const MAX: bool>() -> ScanFn {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::scan::<MAX>;
    }
    scan_portable::<MAX>
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The scan in AVX2, four columns a vector, two vectors an iteration
    //! (two independent minima, so the loop is not bound by the latency of
    //! one compare-and-blend chain).

    use super::{scan_from, Best, Columns};
    use core::arch::x86_64::*;

    /// Whether the AVX2 scan may run here.
    pub(super) fn available() -> bool {
        #[cfg(target_feature = "avx2")]
        {
            true
        }
        #[cfg(all(not(target_feature = "avx2"), feature = "std"))]
        {
            std::is_x86_feature_detected!("avx2")
        }
        #[cfg(all(not(target_feature = "avx2"), not(feature = "std")))]
        {
            false
        }
    }

    /// [`ScanFn`](super::ScanFn) in AVX2; handed out by
    /// [`pick_scan`](super::pick_scan) only where [`available`] is true.
    pub(super) fn scan<const MAX: bool>(
        row: &[f64],
        base: f64,
        i: u32,
        cols: &mut Columns<'_>,
    ) -> (f64, usize) {
        let m = row.len();
        assert!(
            cols.v.len() >= m
                && cols.dist.len() >= m
                && cols.path.len() >= m
                && cols.free.len() * 64 >= m
        );
        debug_assert!(available());
        // SAFETY: AVX2 is available (the only caller checked), and the
        // slices hold at least `m` entries (`free` at least `m` bits), the
        // most the kernel reads or writes.
        unsafe { kernel::<MAX>(row, base, i, cols) }
    }

    /// # Safety
    ///
    /// AVX2 must be available; `v`, `dist` and `path` must hold at least
    /// `row.len()` entries and `free` at least `row.len()` bits.
    #[target_feature(enable = "avx2")]
    unsafe fn kernel<const MAX: bool>(
        row: &[f64],
        base: f64,
        i: u32,
        cols: &mut Columns<'_>,
    ) -> (f64, usize) {
        const STEP: usize = 8;
        const PREFETCH: usize = 256;
        let m = row.len();
        let full = m - m % STEP;
        let free = cols.free;
        let (c_ptr, v_ptr) = (row.as_ptr(), cols.v.as_ptr());
        let (d_ptr, p_ptr) = (cols.dist.as_mut_ptr(), cols.path.as_mut_ptr());
        let vbase = _mm256_set1_pd(base);
        let vi = _mm_set1_epi32(i as i32);
        let lane_bits = _mm256_setr_epi64x(1, 2, 4, 8);
        let eight = _mm256_set1_epi64x(STEP as i64);
        let mut best = [_mm256_set1_pd(f64::INFINITY); 2];
        let mut best_free = [_mm256_setzero_pd(); 2];
        let mut best_j = [_mm256_setzero_si256(); 2];
        let mut jv = [
            _mm256_setr_epi64x(0, 1, 2, 3),
            _mm256_setr_epi64x(4, 5, 6, 7),
        ];
        // The cost row streams from memory, a different row every call:
        // request its head at once, then stay PREFETCH entries ahead of
        // the loop (the hardware prefetcher alone restarts slowly on every
        // row).
        for k in (0..m.min(PREFETCH)).step_by(8) {
            // SAFETY: in bounds (and prefetching never faults anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(k) as *const i8) };
        }
        let mut j = 0;
        while j < full {
            // Eight bits of `free`: `j` is a multiple of 8, so they lie in
            // one word.
            let bits8 = (free[j / 64] >> (j % 64)) as i64;
            if j + PREFETCH < m {
                // SAFETY: in bounds (and prefetching never faults anyway).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(j + PREFETCH) as *const i8) };
            }
            for h in 0..2 {
                let at = j + 4 * h;
                // SAFETY: at + 4 ≤ full ≤ m, within every slice.
                let (c, vv, d) = unsafe {
                    (
                        _mm256_loadu_pd(c_ptr.add(at)),
                        _mm256_loadu_pd(v_ptr.add(at)),
                        _mm256_loadu_pd(d_ptr.add(at)),
                    )
                };
                let r = if MAX {
                    _mm256_sub_pd(_mm256_sub_pd(vbase, c), vv)
                } else {
                    _mm256_sub_pd(_mm256_add_pd(vbase, c), vv)
                };
                // `min_pd(r, d)` is exactly `if r < d { r } else { d }`.
                let better = _mm256_cmp_pd::<_CMP_LT_OQ>(r, d);
                let nd = _mm256_min_pd(r, d);
                // The low halves of the four 64-bit masks, for the u32 path.
                let bm = _mm256_castpd_ps(better);
                let m32 = _mm_castps_si128(_mm_shuffle_ps::<0b10_00_10_00>(
                    _mm256_castps256_ps128(bm),
                    _mm256_extractf128_ps::<1>(bm),
                ));
                // SAFETY: as above; path holds u32 entries `at..at + 4`.
                unsafe {
                    _mm256_storeu_pd(d_ptr.add(at), nd);
                    let p = p_ptr.add(at) as *mut __m128i;
                    let old = _mm_loadu_si128(p);
                    _mm_storeu_si128(p, _mm_blendv_epi8(old, vi, m32));
                }
                let bits = _mm256_set1_epi64x((bits8 >> (4 * h)) & 0xf);
                let fr = _mm256_castsi256_pd(_mm256_cmpeq_epi64(
                    _mm256_and_si256(bits, lane_bits),
                    lane_bits,
                ));
                let lt = _mm256_cmp_pd::<_CMP_LT_OQ>(nd, best[h]);
                let eq = _mm256_cmp_pd::<_CMP_EQ_OQ>(nd, best[h]);
                let take = _mm256_or_pd(lt, _mm256_andnot_pd(best_free[h], _mm256_and_pd(eq, fr)));
                best[h] = _mm256_blendv_pd(best[h], nd, take);
                best_free[h] = _mm256_blendv_pd(best_free[h], fr, take);
                best_j[h] = _mm256_castpd_si256(_mm256_blendv_pd(
                    _mm256_castsi256_pd(best_j[h]),
                    _mm256_castsi256_pd(jv[h]),
                    take,
                ));
                jv[h] = _mm256_add_epi64(jv[h], eight);
            }
            j += STEP;
        }
        let mut acc = Best::NONE;
        for h in 0..2 {
            let (mut d, mut f, mut k) = ([0f64; 4], [0f64; 4], [0i64; 4]);
            // SAFETY: stores into local arrays of four lanes.
            unsafe {
                _mm256_storeu_pd(d.as_mut_ptr(), best[h]);
                _mm256_storeu_pd(f.as_mut_ptr(), best_free[h]);
                _mm256_storeu_si256(k.as_mut_ptr() as *mut __m256i, best_j[h]);
            }
            for l in 0..4 {
                if d[l] < f64::INFINITY {
                    acc.offer(d[l], f[l].to_bits() != 0, k[l] as usize);
                }
            }
        }
        scan_from::<MAX>(full, acc, row, base, i, cols)
    }
}

// ----------------------------------------------------------------- greedy

/// The first block of candidates of a row holds this many columns (its
/// best); each refill twice as many as the block it replaces.
const FIRST_BLOCK: usize = 1;

/// Blocks up to this long are built by insertion during the pass over the
/// row, longer ones by selection.
const INSERTION_MAX: usize = 32;

/// A total order on the optimised costs: smaller key = better pair.
/// `−0` and `+0` get the same key; forbidden pairs get [`FORBIDDEN`].
#[inline(always)]
fn key(x: f64, maximize: bool) -> u64 {
    let y = if maximize { -x } else { x } + 0.0;
    let b = y.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

/// The key of `+∞` (after the sign change for maximising).
const FORBIDDEN: u64 = 0x7ff0_0000_0000_0000 | (1 << 63);

fn greedy_into(
    costs: &[f64],
    rows: usize,
    cols: usize,
    maximize: bool,
    ws: &mut Workspace,
    row_to_col: &mut [Option<usize>],
) {
    let Workspace {
        arena,
        blocks,
        taken,
        eligible,
        heap: heap_keep,
        ..
    } = ws;
    reset(taken, cols, false);
    arena.clear();
    blocks.clear();
    let mut heap_store = core::mem::take(heap_keep);
    heap_store.clear();
    // First candidates of every row: one pass over the matrix.
    for r in 0..rows {
        let row = &costs[r * cols..(r + 1) * cols];
        let start = arena.len();
        candidates::<true>(row, maximize, (0, 0), FIRST_BLOCK, taken, eligible, arena);
        blocks.push((start, arena.len(), start));
        if arena.len() > start {
            heap_store.push(Reverse((key(row[arena[start]], maximize), r)));
        }
    }
    let mut heap = BinaryHeap::from(heap_store);
    let want = rows.min(cols);
    let mut matched = 0;
    while matched < want {
        let Some(Reverse((_, r))) = heap.pop() else {
            break;
        };
        let row = &costs[r * cols..(r + 1) * cols];
        let (start, end, mut cur) = blocks[r];
        let j = arena[cur];
        if !taken[j] {
            taken[j] = true;
            row_to_col[r] = Some(j);
            matched += 1;
            continue;
        }
        // Skip taken candidates; refill when the block is used up.
        while cur < end && taken[arena[cur]] {
            cur += 1;
        }
        if cur == end {
            let last = arena[end - 1];
            let after = (key(row[last], maximize), last);
            let size = 2 * (end - start);
            let new_start = arena.len();
            candidates::<false>(row, maximize, after, size, taken, eligible, arena);
            if arena.len() == new_start {
                blocks[r] = (new_start, new_start, new_start);
                continue; // no allowed free column left: unmatched
            }
            blocks[r] = (new_start, arena.len(), new_start);
            cur = new_start;
        } else {
            blocks[r].2 = cur;
        }
        heap.push(Reverse((key(row[arena[cur]], maximize), r)));
    }
    *heap_keep = heap.into_vec();
}

/// Appends to `arena` the (up to) `size` best allowed columns of `row` in
/// `(key, column)` order — free ones after `after` only, unless `FIRST`
/// (the first block of a row: nothing is taken yet). Short blocks by
/// insertion into a sorted buffer during the pass, long ones by selection.
fn candidates<const FIRST: bool>(
    row: &[f64],
    maximize: bool,
    after: (u64, usize),
    size: usize,
    taken: &[bool],
    eligible: &mut Vec<(u64, usize)>,
    arena: &mut Vec<usize>,
) {
    let allowed = |k: u64, j: usize| FIRST || (!taken[j] && (k, j) > after);
    if size <= INSERTION_MAX {
        let mut buf = [(0u64, 0usize); INSERTION_MAX];
        let mut len = 0;
        for (j, &x) in row.iter().enumerate() {
            let k = key(x, maximize);
            if k >= FORBIDDEN || (len == size && k >= buf[len - 1].0) || !allowed(k, j) {
                continue;
            }
            // Insert after equal keys (columns arrive in increasing order).
            let mut p = if len < size { len } else { len - 1 };
            while p > 0 && buf[p - 1].0 > k {
                buf[p] = buf[p - 1];
                p -= 1;
            }
            buf[p] = (k, j);
            if len < size {
                len += 1;
            }
        }
        arena.extend(buf[..len].iter().map(|&(_, j)| j));
        return;
    }
    eligible.clear();
    for (j, &x) in row.iter().enumerate() {
        let k = key(x, maximize);
        if k < FORBIDDEN && allowed(k, j) {
            eligible.push((k, j));
        }
    }
    if eligible.len() > size {
        eligible.select_nth_unstable(size - 1);
        eligible.truncate(size);
    }
    eligible.sort_unstable();
    arena.extend(eligible.iter().map(|&(_, j)| j));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Every [`ScanFn`] this CPU runs gives the same distances, paths and
    /// pick as the portable one — ties, scanned columns (`v = −∞`,
    /// `d = +∞`), forbidden costs and lengths around the vector width
    /// included.
    #[test]
    fn scans_agree_with_the_portable_loop() {
        let mut state = 11u64;
        let small = |state: &mut u64, k: u64| (next(state) % k) as f64;
        for trial in 0..3000 {
            let m = match trial % 3 {
                0 => 1 + (next(&mut state) % 24) as usize,
                1 => 1 + (next(&mut state) % 300) as usize,
                _ => 1 + (next(&mut state) % 2000) as usize,
            };
            let maximize = trial % 2 == 1;
            let forbidden = if maximize {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
            let row: Vec<f64> = (0..m)
                .map(|_| match next(&mut state) % 10 {
                    0 => forbidden,
                    _ => small(&mut state, 4),
                })
                .collect();
            let mut v: Vec<f64> = (0..m).map(|_| small(&mut state, 3) - 1.0).collect();
            let mut dist: Vec<f64> = (0..m)
                .map(|_| match next(&mut state) % 3 {
                    0 => f64::INFINITY,
                    _ => small(&mut state, 6) - 2.0,
                })
                .collect();
            for j in 0..m {
                if next(&mut state) % 8 == 0 {
                    v[j] = f64::NEG_INFINITY;
                    dist[j] = f64::INFINITY;
                }
            }
            let path: Vec<u32> = (0..m).map(|_| (next(&mut state) % 50) as u32).collect();
            let mut free: Vec<u64> = (0..m.div_ceil(64)).map(|_| next(&mut state)).collect();
            if trial % 5 == 0 {
                free.iter_mut().for_each(|w| *w = 0);
            }
            let base = small(&mut state, 3) - 1.0;
            let scan = |f: ScanFn| {
                let (mut d, mut p) = (dist.clone(), path.clone());
                let mut cols = Columns {
                    v: &v,
                    dist: &mut d,
                    path: &mut p,
                    free: &free,
                };
                let out = f(&row, base, 77, &mut cols);
                (out, d, p)
            };
            let reference = if maximize {
                scan(scan_portable::<true>)
            } else {
                scan(scan_portable::<false>)
            };
            let picked = if maximize {
                pick_scan::<true>()
            } else {
                pick_scan::<false>()
            };
            let got = scan(picked);
            assert_eq!(got.1, reference.1, "distances, m = {m}");
            assert_eq!(got.2, reference.2, "paths, m = {m}");
            assert_eq!(got.0 .0, reference.0 .0, "lowest, m = {m}");
            if reference.0 .0 < f64::INFINITY {
                assert_eq!(got.0 .1, reference.0 .1, "column, m = {m}");
            }
        }
    }

    /// The key of [`Method::Greedy`] orders like the optimised costs.
    #[test]
    fn greedy_key_orders_costs() {
        let xs = [
            f64::NEG_INFINITY,
            -3.5,
            -1e-300,
            -0.0,
            0.0,
            1e-300,
            2.0,
            f64::INFINITY,
        ];
        for w in xs.windows(2) {
            let (a, b) = (key(w[0], false), key(w[1], false));
            assert!(a < b || (w[0] == w[1] && a == b), "{} {}", w[0], w[1]);
            assert!(key(w[0], true) >= key(w[1], true));
        }
        assert_eq!(key(f64::INFINITY, false), FORBIDDEN);
        assert_eq!(key(f64::NEG_INFINITY, true), FORBIDDEN);
    }
}
