//! FAM on checkpoints (SPEC §2): the alignment of every neuron group from
//! the stored probe rows (no weights needed), the optional unsupervised λ
//! search, then per tensor the flat projection fusion of its rows in A's
//! basis, calling the kernels of [`crate::fam`].

use super::FamSettings;
use crate::assignment::{solve_with, Method, Workspace};
use crate::engine::chunks::{par_encode, read_all, rows_per_chunk};
use crate::error::{Error, ErrorKind, Result};
use crate::fam::{
    candidates, correlation, correlation_into, cross_modal_information, flat_oriented_score,
    flatness_activation_importance, flatness_factor, fuse_row, is_fused, normalise_mean, salience,
    sharpness, standardise_columns,
};
use crate::io::TensorView;
use crate::least_squares::{RegMeanModel, RegMeanSystem};
use crate::plan::{GroupPlan, Input, Inputs, Plan, TensorPlan, TensorRule};
use crate::reduce;
use crate::stats::{LayerStats, Rows};
use rayon::prelude::*;
use serde::Serialize;

/// Rows of A per product in [`par_correlation`]: a fixed block, so that
/// every thread count runs the same products and gives the same bytes.
const CORRELATION_BLOCK: usize = 256;

/// [`correlation`] on all cores: A's rows in fixed blocks of
/// [`CORRELATION_BLOCK`], one product per block, each written in place.
pub fn par_correlation(a: &[f32], n_a: usize, b: &[f32], n_b: usize) -> Vec<f32> {
    let rows = a.len().checked_div(n_a).unwrap_or(0);
    if rows == 0 || n_b == 0 {
        return correlation(a, n_a, b, n_b);
    }
    let mut out = vec![0f32; n_a * n_b];
    out.par_chunks_mut(CORRELATION_BLOCK * n_b)
        .zip(a.par_chunks(CORRELATION_BLOCK * rows))
        .for_each(|(out, a)| correlation_into(a, out.len() / n_b, b, n_b, out));
    out
}

/// How one neuron group was aligned (SPEC §2.2–2.3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupAlignment {
    /// The group's name.
    pub name: String,
    /// Neurons of A.
    pub neurons_a: usize,
    /// Neurons of B.
    pub neurons_b: usize,
    /// For each neuron of A, its match in B (`None`: unmatched, kept as A).
    pub matching: Vec<Option<usize>>,
    /// Whether each neuron of A is fused.
    pub fused: Vec<bool>,
    /// FOS of each matched pair (0 where unmatched).
    pub fos: Vec<f32>,
    /// Correlation of each matched pair (0 where unmatched).
    pub correlation: Vec<f32>,
    /// `ĥ_B` of each neuron of B.
    pub sharpness_b: Vec<f32>,
    /// Candidates of A and of B.
    pub candidates: (usize, usize),
}

impl GroupAlignment {
    /// Matched pairs.
    pub fn matched(&self) -> usize {
        self.matching.iter().filter(|m| m.is_some()).count()
    }

    /// The mean of `values` over matched neurons.
    fn matched_mean(&self, values: &[f32]) -> f32 {
        let (sum, n) = self
            .matching
            .iter()
            .zip(values)
            .filter(|(m, _)| m.is_some())
            .fold((0f64, 0usize), |(s, n), (_, &v)| (s + v as f64, n + 1));
        (sum / n.max(1) as f64) as f32
    }

    /// A one-line summary for the report and `flatmerge map`.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "group": self.name,
            "neurons_a": self.neurons_a,
            "neurons_b": self.neurons_b,
            "candidates_a": self.candidates.0,
            "candidates_b": self.candidates.1,
            "matched": self.matched(),
            "dropped_from_b": self.neurons_b - self.matched(),
            "fused": self.fused.iter().filter(|f| **f).count(),
            "mean_correlation": self.matched_mean(&self.correlation),
            "mean_fos": self.matched_mean(&self.fos),
        })
    }
}

fn layer_rows<'a>(input: &'a Input, layer: &str) -> Result<(&'a Rows, &'a Rows, &'a LayerStats)> {
    let missing = || {
        Error::new(
            ErrorKind::Stats,
            format!("per-example rows of layer `{layer}` are missing"),
        )
        .with_file(
            input
                .stats
                .as_ref()
                .map(|(_, p)| p.clone())
                .unwrap_or_default(),
        )
    };
    let stats = input.stats.as_ref().ok_or_else(missing)?;
    let l = stats.0.layer(layer).ok_or_else(missing)?;
    match (&l.x_rows, &l.y_rows) {
        (Some(x), Some(y)) => Ok((x, y, l)),
        _ => Err(missing()),
    }
}

fn modality(input: &Input, rows: usize) -> Vec<u8> {
    input
        .stats
        .as_ref()
        .and_then(|(s, _)| s.modality.clone())
        .filter(|m| m.len() == rows)
        .unwrap_or_else(|| vec![0; rows])
}

/// Aligns every group of the plan (SPEC §2.2–2.3): importance, candidates,
/// the correlation of all neuron pairs as one matrix product, the exact
/// (or greedy) assignment on correlation alone, then FOS and the fused set.
pub fn align(settings: &FamSettings, inputs: &Inputs, plan: &Plan) -> Result<Vec<GroupAlignment>> {
    let (a, b) = (inputs.receiver(), inputs.contributor(0));
    let mut workspace = Workspace::new();
    plan.groups
        .iter()
        .map(|g| align_group(settings, a, b, g, &mut workspace))
        .collect()
}

fn align_group(
    settings: &FamSettings,
    a: &Input,
    b: &Input,
    g: &GroupPlan,
    ws: &mut Workspace,
) -> Result<GroupAlignment> {
    let (xa, ya, _) = layer_rows(a, &g.group.activations)?;
    let (xb, yb, _) = layer_rows(b, &g.contributor_activations)?;
    if ya.rows != yb.rows {
        return Err(Error::new(
            ErrorKind::Stats,
            format!(
                "group `{}`: the receiver's statistics have {} probe rows, the contributor's {}; both models must see the same probe examples",
                g.group.name, ya.rows, yb.rows
            ),
        ));
    }
    let eps = settings.epsilon;
    let importance = |x: &Rows, y: &Rows, input: &Input| {
        let h = normalise_mean(&sharpness(&y.data, y.width, &x.data, x.width));
        let info = cross_modal_information(&y.data, y.width, &modality(input, y.rows), eps);
        let fai = flatness_activation_importance(&salience(&y.data, y.width), &info, &h, eps);
        (h, candidates(&fai, settings.density))
    };
    let (h_a, cand_a) = importance(xa, ya, a);
    let (h_b, cand_b) = importance(xb, yb, b);
    let centre = !settings.raw_cosine;
    let corr = par_correlation(
        &standardise_columns(&ya.data, ya.width, centre),
        ya.width,
        &standardise_columns(&yb.data, yb.width, centre),
        yb.width,
    );
    let costs: Vec<f64> = corr.iter().map(|&c| c as f64).collect();
    let method = if settings.greedy {
        Method::Greedy
    } else {
        Method::Exact
    };
    let assignment = solve_with(&costs, ya.width, yb.width, true, method, ws).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("group `{}`: neuron matching failed: {e}", g.group.name),
        )
    })?;
    let mut fos = vec![0f32; ya.width];
    let mut pair_corr = vec![0f32; ya.width];
    let mut fused = vec![false; ya.width];
    for (i, m) in assignment.row_to_col.iter().enumerate() {
        if let Some(j) = *m {
            pair_corr[i] = corr[i * yb.width + j];
            fos[i] = flat_oriented_score(pair_corr[i], h_a[i], h_b[j], settings.sigma);
            fused[i] = is_fused(fos[i], settings.fos_min, cand_a[i], cand_b[j]);
        }
    }
    Ok(GroupAlignment {
        name: g.group.name.clone(),
        neurons_a: ya.width,
        neurons_b: yb.width,
        matching: assignment.row_to_col,
        fused,
        fos,
        correlation: pair_corr,
        sharpness_b: h_b,
        candidates: (
            cand_a.iter().filter(|c| **c).count(),
            cand_b.iter().filter(|c| **c).count(),
        ),
    })
}

/// How rows and columns of one tensor map into A's basis.
struct Alignment<'a> {
    rows: Option<&'a GroupAlignment>,
    cols: Option<&'a GroupAlignment>,
}

impl Alignment<'_> {
    /// B's row for A's row `r`, when the row is fused; with the flatness factor.
    fn row(&self, r: usize, rows_b: usize, beta: f32) -> Option<(usize, f32)> {
        match self.rows {
            Some(g) => match g.matching.get(r).copied().flatten() {
                Some(j) if g.fused[r] => Some((j, flatness_factor(beta, g.sharpness_b[j]))),
                _ => None,
            },
            None => (r < rows_b).then_some((r, 1.0)),
        }
    }

    /// B's column for A's column `i` (`None`: unmatched, A's value is used).
    fn col(&self, i: usize) -> Option<usize> {
        match self.cols {
            Some(g) => g.matching.get(i).copied().flatten(),
            None => Some(i),
        }
    }
}

/// B's row `j` in A's column basis; columns A has no match for take A's values.
fn row_in_a_basis(
    b: &[f32],
    j: usize,
    cols_b: usize,
    a_row: &[f32],
    align: &Alignment<'_>,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.extend(a_row.iter().enumerate().map(|(i, &a)| match align.col(i) {
        Some(c) if c < cols_b => b[j * cols_b + c],
        _ => a,
    }));
}

/// The rule's parts for one tensor.
pub struct FamTensor<'a> {
    /// Settings.
    pub settings: &'a FamSettings,
    /// `λ_proj`, `λ_ortho` in use (the configured ones, or the search's choice).
    pub lambdas: (f32, f32),
    /// The plan of the tensor.
    pub plan: &'a TensorPlan,
    /// A's tensor.
    pub a: TensorView<'a>,
    /// B's tensor (already mapped to A's name).
    pub b: TensorView<'a>,
    /// All alignments.
    pub alignments: &'a [GroupAlignment],
    /// The inputs (for `x̄_A`).
    pub inputs: &'a Inputs,
}

impl FamTensor<'_> {
    /// Merges the tensor (SPEC §2.4).
    pub fn merge(&self) -> Result<Vec<u8>> {
        let TensorRule::Fam {
            row_group,
            col_group,
            layer,
            average,
        } = &self.plan.rule
        else {
            return Err(Error::new(ErrorKind::Plan, "not a FAM tensor"));
        };
        let align = Alignment {
            rows: row_group.map(|g| &self.alignments[g]),
            cols: col_group.map(|g| &self.alignments[g]),
        };
        let a = read_all(&self.a);
        let b = read_all(&self.b);
        let shape = &self.plan.shape;
        let cols = match shape.len() {
            0 | 1 => 1,
            _ => a.len() / shape[0].max(1),
        };
        let cols_b = if shape.len() >= 2 {
            self.b.shape[1..].iter().product()
        } else {
            1
        };
        let rows_b = self.b.shape.first().copied().unwrap_or(1);
        let direction: Option<(Vec<f32>, f64)> = layer.as_ref().and_then(|l| {
            let x = self
                .inputs
                .receiver()
                .stats
                .as_ref()?
                .0
                .layer(l)?
                .x_mean
                .clone()?;
            let dd = reduce::sum_squares(&x);
            Some((x, dd))
        });
        if let (Some(alpha), Some(layer), false, 2) =
            (self.settings.gram_fusion, layer, *average, shape.len())
        {
            return self.least_squares(&a, &b, &align, layer, cols, cols_b, rows_b, alpha);
        }
        let (lambda_proj, lambda_ortho) = self.lambdas;
        let (beta, eps) = (self.settings.beta, self.settings.epsilon);
        let chunk = rows_per_chunk(cols) * cols;
        let bytes = par_encode(
            a.len(),
            self.plan.out_dtype,
            chunk,
            |start, values, (b_row, tau): &mut (Vec<f32>, Vec<f32>)| {
                values.copy_from_slice(&a[start..start + values.len()]);
                for (k, out_row) in values.chunks_mut(cols).enumerate() {
                    let r = start / cols + k;
                    let Some((j, factor)) = align.row(r, rows_b, beta) else {
                        continue;
                    };
                    let a_row = &a[r * cols..(r + 1) * cols];
                    row_in_a_basis(&b, j, cols_b, a_row, &align, b_row);
                    if *average {
                        for (o, (&x, &y)) in out_row.iter_mut().zip(a_row.iter().zip(b_row.iter()))
                        {
                            *o = 0.5 * (x + y);
                        }
                    } else {
                        let d = direction.as_ref().map(|(d, dd)| (d.as_slice(), *dd));
                        fuse_row(
                            out_row,
                            b_row,
                            d,
                            factor,
                            lambda_proj,
                            lambda_ortho,
                            eps,
                            tau,
                        );
                    }
                }
            },
        );
        Ok(bytes)
    }
}

/// `fusion: least_squares`: every fused weight's Grams are present and of
/// its widths, in both models, before any tensor is read; every problem at
/// once.
pub fn check_grams(inputs: &Inputs, plan: &Plan) -> Result<()> {
    let mut problems = crate::plan::Problems::default();
    let (a, b) = (inputs.receiver(), inputs.contributor(0));
    for t in &plan.tensors {
        let TensorRule::Fam {
            layer: Some(layer),
            average: false,
            ..
        } = &t.rule
        else {
            continue;
        };
        if t.shape.len() != 2 {
            continue;
        }
        let source = t.source.as_deref().unwrap_or(&t.name);
        let b_layer = crate::layers::layer_of(source).map_or(source, |(l, _)| l);
        let b_width = b
            .checkpoint
            .info(source)
            .and_then(|i| i.shape.get(1).copied());
        for (input, layer, width, who) in [
            (a, layer.as_str(), Some(t.shape[1]), "the receiver"),
            (b, b_layer, b_width, "the contributor"),
        ] {
            let problem = match (input.gram(layer), width) {
                (None, _) => format!(
                    "`fusion: least_squares` needs {who}'s Gram of layer `{layer}` (`flatmerge probe --gram`, given as `grams:` or in `stats:`)"
                ),
                (Some((g, _)), Some(w)) if g.width() != w => format!(
                    "{who}'s Gram of layer `{layer}` is {0}×{0} but the layer has {w} inputs",
                    g.width()
                ),
                _ => continue,
            };
            problems.push(
                Error::new(ErrorKind::Stats, problem)
                    .with_file(input.grams_path())
                    .with_tensor(format!("{layer}.x_gram")),
            );
        }
    }
    problems.into_result()
}

impl FamTensor<'_> {
    /// `fusion: least_squares` on one aligned weight (docs/methods.md): B's
    /// fused rows in A's basis (`B̃`, A's rows where nothing is fused, A's
    /// values in the columns B has no match for), B's Gram in A's column
    /// order (`G̃_B`, zero on those columns, so that only A's inputs fix
    /// them), then the SPEC §7 solve `(W_A G̃_A + B̃ G̃_B)(G̃_A + G̃_B)⁻¹`
    /// (shrunk Grams, no bias folded: biases keep the flat rule). A row A
    /// keeps comes back as A's row. The flatness factor β does not apply.
    #[allow(clippy::too_many_arguments)]
    fn least_squares(
        &self,
        a: &[f32],
        b: &[f32],
        align: &Alignment<'_>,
        layer: &str,
        cols: usize,
        cols_b: usize,
        rows_b: usize,
        alpha: f64,
    ) -> Result<Vec<u8>> {
        let rows = self.plan.shape[0];
        let (receiver, contributor) = (self.inputs.receiver(), self.inputs.contributor(0));
        let source = self.plan.source.as_deref().unwrap_or(&self.plan.name);
        let b_layer = crate::layers::layer_of(source).map_or(source, |(l, _)| l);
        let gram_of = |input: &Input, layer: &str, width: usize| -> Result<Vec<f32>> {
            let (gram, path) = input.gram(layer).ok_or_else(|| {
                Error::new(
                    ErrorKind::Stats,
                    format!("`fusion: least_squares` needs the Gram of layer `{layer}`"),
                )
                .with_file(input.grams_path())
                .with_tensor(format!("{layer}.x_gram"))
            })?;
            if gram.width() != width {
                return Err(Error::new(
                    ErrorKind::Stats,
                    format!(
                        "the Gram of layer `{layer}` is {0}×{0} but its weight has {width} columns",
                        gram.width()
                    ),
                )
                .with_file(path)
                .with_tensor(format!("{layer}.x_gram")));
            }
            Ok(gram.values().into_owned())
        };
        let gram_a = gram_of(receiver, layer, cols)?;
        let gram_b = gram_of(contributor, b_layer, cols_b)?;
        let matched: Vec<Option<usize>> = (0..cols)
            .map(|i| align.col(i).filter(|&c| c < cols_b))
            .collect();
        let mut gram_b_in_a = vec![0f32; cols * cols];
        for (i, ci) in matched.iter().enumerate() {
            let Some(ci) = ci else { continue };
            for (k, ck) in matched.iter().enumerate() {
                if let Some(ck) = ck {
                    gram_b_in_a[i * cols + k] = gram_b[ci * cols_b + ck];
                }
            }
        }
        drop(gram_b);
        let mut b_in_a = vec![0f32; rows * cols];
        let mut row = Vec::with_capacity(cols);
        for (r, out) in b_in_a.chunks_mut(cols).enumerate() {
            let a_row = &a[r * cols..(r + 1) * cols];
            match align.row(r, rows_b, self.settings.beta) {
                Some((j, _)) => {
                    row_in_a_basis(b, j, cols_b, a_row, align, &mut row);
                    out.copy_from_slice(&row);
                }
                None => out.copy_from_slice(a_row),
            }
        }
        let err = |e: crate::least_squares::LsError| {
            Error::new(
                ErrorKind::Stats,
                format!("the least-squares fusion of layer `{layer}` failed: {e}"),
            )
            .with_tensor(&self.plan.name)
        };
        let mut system = RegMeanSystem::new(rows, cols, false, alpha).map_err(err)?;
        for (weight, gram) in [(a, &gram_a), (b_in_a.as_slice(), &gram_b_in_a)] {
            system
                .add_model(&RegMeanModel {
                    weight,
                    bias: None,
                    gram,
                    mean: None,
                    w: 1.0,
                })
                .map_err(err)?;
        }
        let solution = system.solve().map_err(err)?;
        let dtype = self.plan.out_dtype;
        let mut bytes =
            crate::engine::chunks::tensor_buffer::<u8>(solution.weight.len() * dtype.size());
        crate::dtype::encode_f32(dtype, &solution.weight, &mut bytes);
        Ok(bytes)
    }
}

/// Every `(λ_proj, λ_ortho, L(λ))` a λ search evaluated, in grid order.
pub type LambdaGrid = Vec<(f32, f32, f64)>;

/// The unsupervised λ search of SPEC §2.5. For every producer weight of a
/// group with per-example rows in both models, the merged layer's outputs
/// are `Z₀ + λ_proj·Z_p + λ_ortho·Z_o` (linear in λ), so each model's
/// relative error is a quadratic in `(λ_proj, λ_ortho)`: its six
/// coefficients are summed over layers once, then every grid point is
/// evaluated. Returns the chosen pair (the first in grid order on a tie)
/// and the whole grid.
pub fn lambda_search<'a>(
    settings: &FamSettings,
    inputs: &Inputs,
    plan: &Plan,
    alignments: &[GroupAlignment],
    view: impl Fn(bool, &str) -> Result<TensorView<'a>>,
) -> Result<((f32, f32), LambdaGrid)> {
    let mut q = [0f64; 6];
    for tensor in &plan.tensors {
        let TensorRule::Fam {
            row_group: Some(g),
            col_group,
            layer: Some(layer),
            average: false,
        } = &tensor.rule
        else {
            continue;
        };
        let Some(source) = &tensor.source else {
            continue;
        };
        let b_layer = source.trim_end_matches(".weight");
        let (Ok((xa, ya, la)), Ok((xb, yb, _))) = (
            layer_rows(inputs.receiver(), layer),
            layer_rows(inputs.contributor(0), b_layer),
        ) else {
            continue;
        };
        let align = Alignment {
            rows: Some(&alignments[*g]),
            cols: col_group.map(|c| &alignments[c]),
        };
        let a = read_all(&view(true, &tensor.name)?);
        let b = read_all(&view(false, &tensor.name)?);
        let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
        let cols_b = b.len() / yb.width.max(1);
        let Some(d) = la.x_mean.as_ref() else {
            continue;
        };
        let dd = reduce::sum_squares(d);
        // The projected and orthogonal parts of the fused rows (f·P and O), zero elsewhere.
        let mut p_part = vec![0f32; a.len()];
        let mut o_part = vec![0f32; a.len()];
        // The layer's bias, when it has one: b* = b_A + λ_proj·f·(b_B − b_A) on fused rows.
        let bias_name = format!("{layer}.bias");
        let bias = match plan.tensors.iter().find(|t| t.name == bias_name) {
            Some(t) => Some((
                read_all(&view(true, &t.name)?),
                read_all(&view(false, &t.name)?),
            )),
            None => None,
        };
        let mut bias_a = vec![0f32; rows];
        let mut bias_p = vec![0f32; rows];
        if let Some((ba, _)) = &bias {
            bias_a.copy_from_slice(&ba[..rows]);
        }
        let (mut b_row, mut tau) = (Vec::new(), Vec::new());
        for r in 0..rows {
            let Some((j, factor)) = align.row(r, yb.width, settings.beta) else {
                continue;
            };
            if let Some((ba, bb)) = &bias {
                bias_p[r] = factor * (bb[j] - ba[r]);
            }
            let a_row = &a[r * cols..(r + 1) * cols];
            row_in_a_basis(&b, j, cols_b, a_row, &align, &mut b_row);
            tau.clear();
            tau.extend(b_row.iter().zip(a_row).map(|(x, y)| x - y));
            let c = crate::safe_m::projection_coefficient(&tau, d, dd, settings.epsilon);
            for i in 0..cols {
                let p = c * d[i];
                p_part[r * cols + i] = factor * p;
                o_part[r * cols + i] = tau[i] - p;
            }
        }
        // Each model's rows in A's basis: X (inputs), Y (outputs of A's neurons), and which outputs count.
        let xb_a: Vec<f32> = (0..xb.rows)
            .flat_map(|n| (0..cols).map(move |i| (n, i)))
            .map(|(n, i)| match align.col(i) {
                Some(c) if c < xb.width => xb.data[n * xb.width + c],
                _ => xa.data[n * xa.width + i],
            })
            .collect();
        let matched: Vec<Option<usize>> = (0..rows)
            .map(|r| align.rows.and_then(|g| g.matching[r]))
            .collect();
        for (x, y, y_width, is_b) in [
            (&xa.data, &ya.data, ya.width, false),
            (&xb_a, &yb.data, yb.width, true),
        ] {
            let n = x.len() / cols.max(1);
            let z0 = matmul_t(x, n, cols, &a, rows);
            let zp = matmul_t(x, n, cols, &p_part, rows);
            let zo = matmul_t(x, n, cols, &o_part, rows);
            let (mut c, mut norm) = ([0f64; 6], 0f64);
            for s in 0..n {
                for r in 0..rows {
                    let target = match (is_b, matched[r]) {
                        (false, _) => y[s * y_width + r],
                        (true, Some(j)) => y[s * y_width + j],
                        // A's unmatched neurons are compared with A only.
                        (true, None) => continue,
                    };
                    let (z, p, o) = (
                        (z0[s * rows + r] + bias_a[r] - target) as f64,
                        (zp[s * rows + r] + bias_p[r]) as f64,
                        zo[s * rows + r] as f64,
                    );
                    c[0] += z * z;
                    c[1] += p * p;
                    c[2] += o * o;
                    c[3] += 2.0 * z * p;
                    c[4] += 2.0 * z * o;
                    c[5] += 2.0 * p * o;
                    norm += (target as f64) * (target as f64);
                }
            }
            if norm > 0.0 {
                for (qi, ci) in q.iter_mut().zip(c) {
                    *qi += ci / norm;
                }
            }
        }
    }
    let mut grid = Vec::new();
    let mut best: Option<(f32, f32, f64)> = None;
    for &lp in &settings.lambda_grid {
        for &lo in &settings.lambda_grid {
            let (p, o) = (lp as f64, lo as f64);
            let loss = q[0] + p * p * q[1] + o * o * q[2] + p * q[3] + o * q[4] + p * o * q[5];
            grid.push((lp, lo, loss));
            if best.is_none_or(|(_, _, l)| loss < l) {
                best = Some((lp, lo, loss));
            }
        }
    }
    let (lp, lo, _) = best.unwrap_or((settings.lambda_proj, settings.lambda_ortho, 0.0));
    Ok(((lp, lo), grid))
}

/// `X Wᵀ` for `X` `[n, k]` and `W` `[m, k]`, row-major `[n, m]`.
fn matmul_t(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    if n == 0 || m == 0 || k == 0 {
        return out;
    }
    // SAFETY: x is [n × k] row-major, w is read as its transpose [k × m]
    // (row stride 1, column stride k), out is [n × m]; no aliasing.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_correlation_is_the_serial_product_at_any_thread_count() {
        let (n_a, n_b, rows) = (1000, 700, 48);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let a: Vec<f32> = (0..n_a * rows).map(|_| next()).collect();
        let b: Vec<f32> = (0..n_b * rows).map(|_| next()).collect();
        let serial = correlation(&a, n_a, &b, n_b);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let parallel = pool.install(|| par_correlation(&a, n_a, &b, n_b));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&parallel), bits(&serial), "{threads} threads");
        }
        assert_eq!(par_correlation(&[], 0, &[], 0), Vec::<f32>::new());
    }
}
