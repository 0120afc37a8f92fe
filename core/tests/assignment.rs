//! The assignment solver (SPEC §2.3) against brute force on small matrices,
//! planted permutations at n = 500, a reference greedy, and one test per
//! error.

use flatmerge::assignment::{
    greedy, solve, solve_with, Assignment, AssignmentError, Method, Workspace,
};

// ---------------------------------------------------------------- helpers

/// splitmix64, seeded per test.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// The kinds of small matrices: continuous values of both signs, small
/// integers (many ties), and a constant matrix (all tied).
#[derive(Clone, Copy, Debug)]
enum Values {
    Continuous,
    SmallIntegers,
    Constant,
}

fn matrix(rng: &mut Rng, rows: usize, cols: usize, values: Values) -> Vec<f64> {
    (0..rows * cols)
        .map(|_| match values {
            Values::Continuous => rng.uniform() * 20.0 - 10.0,
            Values::SmallIntegers => rng.below(5) as f64 - 2.0,
            Values::Constant => -1.5,
        })
        .collect()
}

/// The optimum by enumerating every injective map of the smaller side into
/// the larger one; `None` when every complete map uses a forbidden pair.
fn brute_force(costs: &[f64], rows: usize, cols: usize, maximize: bool) -> Option<f64> {
    let (n, m) = (rows.min(cols), rows.max(cols));
    // `at[a][b]`: `a` indexes the smaller side, `b` the larger one.
    let at: Vec<Vec<f64>> = (0..n)
        .map(|a| {
            (0..m)
                .map(|b| {
                    if rows <= cols {
                        costs[a * cols + b]
                    } else {
                        costs[b * cols + a]
                    }
                })
                .collect()
        })
        .collect();
    let mut search = Search {
        at,
        forbidden: if maximize {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        },
        maximize,
        used: vec![false; m],
        best: None,
    };
    search.go(0, 0.0);
    search.best
}

struct Search {
    at: Vec<Vec<f64>>,
    forbidden: f64,
    maximize: bool,
    used: Vec<bool>,
    best: Option<f64>,
}

impl Search {
    fn go(&mut self, a: usize, sum: f64) {
        if a == self.at.len() {
            let better = match self.best {
                None => true,
                Some(b) => (self.maximize && sum > b) || (!self.maximize && sum < b),
            };
            if better {
                self.best = Some(sum);
            }
            return;
        }
        for b in 0..self.used.len() {
            let c = self.at[a][b];
            if !self.used[b] && c != self.forbidden {
                self.used[b] = true;
                self.go(a + 1, sum + c);
                self.used[b] = false;
            }
        }
    }
}

/// Every row and column used at most once, indices in range, and the total
/// equal to the sum of the matched costs.
fn check_valid(a: &Assignment, costs: &[f64], rows: usize, cols: usize) {
    assert_eq!(a.row_to_col.len(), rows);
    let mut used = vec![false; cols];
    let mut sum = 0.0;
    for (r, c) in a.pairs() {
        assert!(c < cols, "column {c} out of range");
        assert!(!used[c], "column {c} used twice");
        used[c] = true;
        sum += costs[r * cols + c];
    }
    let tol = 1e-9 * (1.0 + sum.abs());
    assert!(
        (a.total - sum).abs() <= tol,
        "total {} but the pairs sum to {sum}",
        a.total
    );
    let back = a.col_to_row(cols);
    for (r, c) in a.pairs() {
        assert_eq!(back[c], Some(r));
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

/// Greedy by its definition: sort all allowed pairs by (cost, row, col) and
/// take each whose row and column are both free.
fn reference_greedy(costs: &[f64], rows: usize, cols: usize, maximize: bool) -> Vec<Option<usize>> {
    let sign = if maximize { -1.0 } else { 1.0 };
    let mut pairs: Vec<(f64, usize, usize)> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .map(|(r, c)| (sign * costs[r * cols + c] + 0.0, r, c))
        .filter(|p| p.0 != f64::INFINITY)
        .collect();
    pairs.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let mut out = vec![None; rows];
    let mut col_used = vec![false; cols];
    for (_, r, c) in pairs {
        if out[r].is_none() && !col_used[c] {
            out[r] = Some(c);
            col_used[c] = true;
        }
    }
    out
}

fn transposed(costs: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; costs.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = costs[r * cols + c];
        }
    }
    t
}

/// `sim[i][perm[i]] = 1 + noise`, every other entry noise.
fn planted(rng: &mut Rng, n: usize, noise: f64) -> (Vec<f64>, Vec<usize>) {
    let perm = rng.permutation(n);
    let mut sim: Vec<f64> = (0..n * n).map(|_| noise * rng.normal()).collect();
    for (i, &p) in perm.iter().enumerate() {
        sim[i * n + p] += 1.0;
    }
    (sim, perm)
}

/// The tests, in a module so that `cargo test -p flatmerge assignment`
/// selects them by name.
mod assignment {
    use super::*;

    // ------------------------------------------------------------ brute force

    #[test]
    fn matches_brute_force_on_small_matrices() {
        let mut rng = Rng(1);
        let mut ws = Workspace::new();
        let mut cases = 0;
        for rows in 1..=7 {
            for cols in 1..=7 {
                for values in [Values::Continuous, Values::SmallIntegers, Values::Constant] {
                    let repeats = if matches!(values, Values::Constant) {
                        1
                    } else {
                        4
                    };
                    for _ in 0..repeats {
                        let costs = matrix(&mut rng, rows, cols, values);
                        for maximize in [false, true] {
                            let expected = brute_force(&costs, rows, cols, maximize).unwrap();
                            let got =
                                solve_with(&costs, rows, cols, maximize, Method::Exact, &mut ws)
                                    .unwrap();
                            check_valid(&got, &costs, rows, cols);
                            assert_eq!(got.matched(), rows.min(cols));
                            assert!(
                                close(got.total, expected),
                                "{rows}x{cols} {values:?} maximize={maximize}: {} != {expected}",
                                got.total
                            );
                            // A fresh workspace gives the same bits.
                            assert_eq!(solve(&costs, rows, cols, maximize).unwrap(), got);
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 49 * 9 * 2);
    }

    #[test]
    fn forbidden_pairs_against_brute_force() {
        // About 45% of the pairs forbidden: many problems are infeasible.
        let mut rng = Rng(2);
        let (mut feasible, mut infeasible) = (0, 0);
        for _ in 0..300 {
            let rows = 1 + rng.below(6);
            let cols = 1 + rng.below(6);
            let maximize = rng.below(2) == 1;
            let forbidden = if maximize {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
            let mut costs = matrix(&mut rng, rows, cols, Values::SmallIntegers);
            for c in costs.iter_mut() {
                if rng.below(20) < 9 {
                    *c = forbidden;
                }
            }
            match (
                brute_force(&costs, rows, cols, maximize),
                solve(&costs, rows, cols, maximize),
            ) {
                (Some(expected), Ok(got)) => {
                    check_valid(&got, &costs, rows, cols);
                    assert_eq!(got.matched(), rows.min(cols));
                    assert!(got.total.is_finite());
                    assert!(close(got.total, expected), "{} != {expected}", got.total);
                    feasible += 1;
                }
                (None, Err(AssignmentError::Infeasible)) => infeasible += 1,
                (b, s) => panic!("brute force {b:?}, solver {s:?}"),
            }
        }
        assert!(
            feasible > 50 && infeasible > 25,
            "{feasible} / {infeasible}"
        );
    }

    #[test]
    fn both_orientations_give_the_same_total() {
        let mut rng = Rng(3);
        for (rows, cols) in [(40, 70), (70, 40), (1, 50), (50, 1), (33, 33)] {
            let costs = matrix(&mut rng, rows, cols, Values::Continuous);
            let t = transposed(&costs, rows, cols);
            for maximize in [false, true] {
                let a = solve(&costs, rows, cols, maximize).unwrap();
                let b = solve(&t, cols, rows, maximize).unwrap();
                check_valid(&a, &costs, rows, cols);
                check_valid(&b, &t, cols, rows);
                assert_eq!(a.matched(), rows.min(cols));
                assert!(close(a.total, b.total), "{} != {}", a.total, b.total);
                // And no exchange of two pairs (or of a pair's column for a
                // free one, or its row for an unmatched one) improves the total: a necessary optimality test.
                assert_no_improving_swap(&a, &costs, rows, cols, maximize);
            }
        }
    }

    fn assert_no_improving_swap(
        a: &Assignment,
        costs: &[f64],
        rows: usize,
        cols: usize,
        maximize: bool,
    ) {
        let s = if maximize { -1.0 } else { 1.0 };
        let c = |r: usize, j: usize| s * costs[r * cols + j];
        let pairs: Vec<(usize, usize)> = a.pairs().collect();
        let owner = a.col_to_row(cols);
        for &(r1, c1) in &pairs {
            for &(r2, c2) in &pairs {
                let delta = c(r1, c2) + c(r2, c1) - c(r1, c1) - c(r2, c2);
                assert!(delta >= -1e-9, "swapping rows {r1} and {r2} gains {delta}");
            }
            for (j, o) in owner.iter().enumerate() {
                if o.is_none() {
                    assert!(c(r1, j) - c(r1, c1) >= -1e-9);
                }
            }
            for r0 in (0..rows).filter(|&r| a.row_to_col[r].is_none()) {
                assert!(c(r0, c1) - c(r1, c1) >= -1e-9);
            }
        }
    }

    // ---------------------------------------------------------------- planted

    #[test]
    fn planted_permutation_is_recovered_at_n_500() {
        let mut rng = Rng(4);
        let n = 500;
        // Noise 0.1: the weakest planted pair (≈ 1 − 3.3σ) still beats the
        // strongest stray one (≈ 4.9σ) by a margin, so greedy finds it too.
        let (sim, perm) = planted(&mut rng, n, 0.1);
        let exact = solve(&sim, n, n, true).unwrap();
        let found: Vec<usize> = exact.row_to_col.iter().map(|c| c.unwrap()).collect();
        assert_eq!(found, perm);
        // Minimising the negated similarity is the same problem.
        let neg: Vec<f64> = sim.iter().map(|x| -x).collect();
        let min = solve(&neg, n, n, false).unwrap();
        assert_eq!(min.row_to_col, exact.row_to_col);
        assert!(close(min.total, -exact.total));
        // Greedy finds it too: the planted pairs win their rows by a margin.
        let g = greedy(&sim, n, n, true).unwrap();
        assert_eq!(g.row_to_col, exact.row_to_col);
        assert_eq!(g.total, exact.total);
    }

    #[test]
    fn planted_rectangular_keeps_the_planted_pairs() {
        // 300 rows of A against 450 columns of B (B's extra neurons dropped),
        // and the transpose (A's extra neurons unmatched).
        let mut rng = Rng(5);
        let (rows, cols) = (300, 450);
        let cols_perm = rng.permutation(cols);
        let mut sim: Vec<f64> = (0..rows * cols).map(|_| 0.05 * rng.normal()).collect();
        for r in 0..rows {
            sim[r * cols + cols_perm[r]] += 1.0;
        }
        let a = solve(&sim, rows, cols, true).unwrap();
        for (r, &c) in a.row_to_col.iter().zip(&cols_perm) {
            assert_eq!(*r, Some(c));
        }
        let t = transposed(&sim, rows, cols);
        let b = solve(&t, cols, rows, true).unwrap();
        assert_eq!(b.matched(), rows);
        for (r, &p) in cols_perm.iter().enumerate() {
            assert_eq!(b.row_to_col[p], (r < rows).then_some(r));
        }
        assert_eq!(
            greedy(&t, cols, rows, true).unwrap().row_to_col,
            b.row_to_col
        );
    }

    // ----------------------------------------------------------------- greedy

    #[test]
    fn greedy_equals_its_definition() {
        let mut rng = Rng(6);
        for _ in 0..200 {
            let rows = 1 + rng.below(12);
            let cols = 1 + rng.below(12);
            let maximize = rng.below(2) == 1;
            let values = if rng.below(2) == 0 {
                Values::Continuous
            } else {
                Values::SmallIntegers
            };
            let mut costs = matrix(&mut rng, rows, cols, values);
            if rng.below(4) == 0 {
                let forbidden = if maximize {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                };
                for c in costs.iter_mut() {
                    if rng.below(4) == 0 {
                        *c = forbidden;
                    }
                }
            }
            let g = greedy(&costs, rows, cols, maximize).unwrap();
            check_valid(&g, &costs, rows, cols);
            assert_eq!(g.row_to_col, reference_greedy(&costs, rows, cols, maximize));
            let (n, m) = (rows.min(cols), rows.max(cols));
            let maps: usize = (m - n + 1..=m).product();
            if maps > 100_000 {
                continue;
            }
            if let Some(best) = brute_force(&costs, rows, cols, maximize) {
                if g.matched() == rows.min(cols) {
                    assert!(if maximize {
                        g.total <= best + 1e-9
                    } else {
                        g.total >= best - 1e-9
                    });
                }
            }
        }
    }

    #[test]
    fn greedy_refills_when_every_row_wants_the_same_columns() {
        // Every row prefers column 0, then 1, … : row r skips r taken columns,
        // which exhausts the first candidate lists and the doubled refills.
        let mut rng = Rng(7);
        let mut ws = Workspace::new();
        for (rows, cols) in [(150, 200), (200, 150), (97, 97)] {
            let costs: Vec<f64> = (0..rows * cols)
                .map(|k| (k % cols) as f64 + 1e-3 * rng.uniform())
                .collect();
            for maximize in [false, true] {
                let g = solve_with(&costs, rows, cols, maximize, Method::Greedy, &mut ws).unwrap();
                check_valid(&g, &costs, rows, cols);
                assert_eq!(g.matched(), rows.min(cols));
                assert_eq!(g.row_to_col, reference_greedy(&costs, rows, cols, maximize));
            }
        }
    }

    // ----------------------------------------------------------- determinism

    #[test]
    fn constant_matrix_gives_the_identity() {
        for (rows, cols) in [(6, 6), (4, 9), (9, 4)] {
            let costs = vec![2.5; rows * cols];
            for method in [Method::Exact, Method::Greedy] {
                let a =
                    solve_with(&costs, rows, cols, false, method, &mut Workspace::new()).unwrap();
                for r in 0..rows {
                    assert_eq!(a.row_to_col[r], (r < cols).then_some(r), "{method:?}");
                }
            }
        }
    }

    #[test]
    fn one_workspace_serves_problems_of_every_shape() {
        let mut rng = Rng(8);
        let mut ws = Workspace::new();
        for _ in 0..60 {
            let rows = 1 + rng.below(40);
            let cols = 1 + rng.below(40);
            let costs = matrix(&mut rng, rows, cols, Values::SmallIntegers);
            for method in [Method::Exact, Method::Greedy] {
                let reused = solve_with(&costs, rows, cols, true, method, &mut ws).unwrap();
                let fresh =
                    solve_with(&costs, rows, cols, true, method, &mut Workspace::new()).unwrap();
                assert_eq!(reused, fresh);
            }
        }
    }

    // ----------------------------------------------------------------- errors

    #[test]
    fn nan_is_rejected_with_its_position() {
        let mut costs = vec![0.5; 12];
        costs[7] = f64::NAN;
        costs[9] = f64::NAN;
        for method in [Method::Exact, Method::Greedy] {
            for maximize in [false, true] {
                let err = solve_with(&costs, 3, 4, maximize, method, &mut Workspace::new());
                assert_eq!(err, Err(AssignmentError::NotANumber { row: 1, col: 3 }));
            }
        }
        assert!(
            err_text(AssignmentError::NotANumber { row: 1, col: 3 }).contains("row 1, column 3")
        );
    }

    #[test]
    fn an_infinity_in_the_optimised_direction_is_rejected() {
        let mut costs = vec![0.5; 6];
        costs[4] = f64::NEG_INFINITY;
        assert_eq!(
            solve(&costs, 2, 3, false),
            Err(AssignmentError::Unbounded { row: 1, col: 1 })
        );
        assert_eq!(
            greedy(&costs, 2, 3, false),
            Err(AssignmentError::Unbounded { row: 1, col: 1 })
        );
        // Maximising, −∞ only forbids the pair.
        let a = solve(&costs, 2, 3, true).unwrap();
        assert_ne!(a.row_to_col[1], Some(1));
        assert_eq!(a.total, 1.0);
        costs[4] = f64::INFINITY;
        assert_eq!(
            solve(&costs, 2, 3, true),
            Err(AssignmentError::Unbounded { row: 1, col: 1 })
        );
        assert_eq!(solve(&costs, 2, 3, false).unwrap().total, 1.0);
    }

    #[test]
    fn infeasible_problems_are_reported() {
        let inf = f64::INFINITY;
        // Both rows can only use column 0.
        let costs = [1.0, inf, inf, 2.0, inf, inf];
        assert_eq!(solve(&costs, 2, 3, false), Err(AssignmentError::Infeasible));
        // Greedy matches what it can.
        let g = greedy(&costs, 2, 3, false).unwrap();
        assert_eq!(g.row_to_col, vec![Some(0), None]);
        assert_eq!(g.total, 1.0);
        // A row with no allowed pair at all, and the tall orientation.
        assert_eq!(
            solve(&[inf, inf, 1.0, 2.0], 2, 2, false),
            Err(AssignmentError::Infeasible)
        );
        assert_eq!(
            solve(&[inf, inf, inf, 0.0, inf, 2.0], 3, 2, false),
            Err(AssignmentError::Infeasible)
        );
        // Tall with a row all forbidden is fine: that row stays unmatched.
        let a = solve(&[inf, inf, 0.0, 1.0, 2.0, 0.0], 3, 2, false).unwrap();
        assert_eq!(a.row_to_col, vec![None, Some(0), Some(1)]);
        // The solver recovers: the same workspace solves the next problem.
        let mut ws = Workspace::new();
        let bad = solve_with(&costs, 2, 3, false, Method::Exact, &mut ws);
        assert_eq!(bad, Err(AssignmentError::Infeasible));
        let good = [3.0, 1.0, 2.0, 1.0, 5.0, 9.0];
        let a = solve_with(&good, 2, 3, false, Method::Exact, &mut ws).unwrap();
        assert_eq!(a, solve(&good, 2, 3, false).unwrap());
        assert!(err_text(AssignmentError::Infeasible).contains("no complete assignment"));
    }

    #[test]
    fn empty_input_gives_an_empty_assignment() {
        for method in [Method::Exact, Method::Greedy] {
            let mut ws = Workspace::new();
            let a = solve_with(&[], 0, 5, true, method, &mut ws).unwrap();
            assert_eq!(a.row_to_col, Vec::<Option<usize>>::new());
            assert_eq!(a.total, 0.0);
            let b = solve_with(&[], 3, 0, false, method, &mut ws).unwrap();
            assert_eq!(b.row_to_col, vec![None; 3]);
            assert_eq!(b.total, 0.0);
            assert_eq!(b.matched(), 0);
            let c = solve_with(&[], 0, 0, false, method, &mut ws).unwrap();
            assert!(c.row_to_col.is_empty());
        }
    }

    #[test]
    fn shape_mismatch_is_rejected() {
        assert_eq!(
            solve(&[1.0; 5], 2, 3, false),
            Err(AssignmentError::Shape {
                len: 5,
                rows: 2,
                cols: 3
            })
        );
        assert_eq!(
            greedy(&[], usize::MAX, 2, false),
            Err(AssignmentError::Shape {
                len: 0,
                rows: usize::MAX,
                cols: 2
            })
        );
        assert!(err_text(AssignmentError::Shape {
            len: 5,
            rows: 2,
            cols: 3
        })
        .contains("5 costs do not form a 2 x 3 matrix"));
    }

    fn err_text(e: AssignmentError) -> String {
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        boxed.to_string()
    }
}
