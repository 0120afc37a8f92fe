//! The merge-quality benchmark (the task-vector setting of the merging
//! literature), as a module that the benchmark binary (`benches/quality.rs`)
//! and the smoke test (`tests/quality_smoke.rs`) both include.
//!
//! Per seed: an ancestor MLP body (32 → 64 → 64, GELU) and a head are
//! trained on a pre-training task; copies are fine-tuned (body and a new
//! head) on three different tasks ([`tasks`]); the bodies are saved as MLP
//! model directories, probed natively on a meta-probe mixture of the tasks'
//! inputs, and merged with every method through the library's engine; each
//! task is evaluated on the merged body with its own fine-tuned head.
//!
//! Everything is deterministic: fixed seeds, single-threaded training, and
//! a library whose probe and merges do not depend on the thread count.

#![allow(dead_code)]

pub mod merges;
pub mod nn;
pub mod tasks;
pub mod variants;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flatmerge::demo::Rng;
use flatmerge::probe::mlp::Activation;

use flatmerge::safe_m::ScoreForm;
use merges::{baseline_yaml, fam_yaml, regmean_yaml, safe_m_yaml, FamGroups, Merger};
use nn::{accuracy, Dense, Net};
use tasks::{Sizes, Task};

/// Hidden widths of the body (input first).
pub const WIDTHS: [usize; 3] = [tasks::DIM, 64, 64];

/// The task-arithmetic λ grid searched on the validation split.
pub const LAMBDA_GRID: [f64; 15] = [
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5,
];

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Number of seeds.
    pub seeds: usize,
    /// The first seed (seeds are `first_seed ..`).
    pub first_seed: u64,
    /// Smaller data and fewer epochs (seconds, for the smoke test).
    pub quick: bool,
    /// Threads for the probe and the engine (`None`: all cores; results
    /// do not depend on it).
    pub threads: Option<usize>,
    /// Keep checkpoints, statistics and merges under this folder.
    pub keep: Option<PathBuf>,
    /// Progress lines on stderr.
    pub verbose: bool,
    /// The whole SAFE-M variant grid (default unless quick) or a few settings.
    pub full_grid: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seeds: 5,
            first_seed: 1,
            quick: false,
            threads: None,
            keep: None,
            verbose: false,
            full_grid: true,
        }
    }
}

/// The usage text.
pub const USAGE: &str = "\
cargo bench --bench quality [-- OPTIONS]

  --seeds N        seeds to run (default 5; quick mode: 1)   env QUALITY_SEEDS
  --first-seed N   first seed (default 1)                     env QUALITY_FIRST_SEED
  --quick          small data, few epochs (well under a minute) env QUALITY_QUICK=1
  --threads N      probe / merge threads (results do not depend on it) env QUALITY_THREADS
  --keep DIR       keep checkpoints, statistics, merges and reports under DIR
  --grid full|small  SAFE-M variant grid (default: full; quick mode: small)
  --quiet          no progress on stderr
  --help           this text
";

impl Options {
    /// Parses the environment (`QUALITY_*`), then `args` (which win).
    /// `--bench`, which cargo passes to every benchmark, is ignored.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            verbose: true,
            ..Options::default()
        };
        let mut seeds = None;
        let mut grid = None;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |what: &str, v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{what}: `{v}` is not a non-negative integer"))
        };
        if let Some(v) = env("QUALITY_QUICK") {
            o.quick = v != "0";
        }
        if let Some(v) = env("QUALITY_SEEDS") {
            seeds = Some(num("QUALITY_SEEDS", &v)? as usize);
        }
        if let Some(v) = env("QUALITY_FIRST_SEED") {
            o.first_seed = num("QUALITY_FIRST_SEED", &v)?;
        }
        if let Some(v) = env("QUALITY_THREADS") {
            o.threads = Some(num("QUALITY_THREADS", &v)? as usize);
        }
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            match a.as_str() {
                "--bench" => {}
                "--quick" => o.quick = true,
                "--quiet" => o.verbose = false,
                "--seeds" => seeds = Some(num("--seeds", &value("--seeds")?)? as usize),
                "--first-seed" => o.first_seed = num("--first-seed", &value("--first-seed")?)?,
                "--threads" => o.threads = Some(num("--threads", &value("--threads")?)? as usize),
                "--keep" => o.keep = Some(PathBuf::from(value("--keep")?)),
                "--grid" => {
                    grid = Some(match value("--grid")?.as_str() {
                        "full" => true,
                        "small" => false,
                        other => return Err(format!("--grid: `{other}` is not `full` or `small`")),
                    })
                }
                "--help" | "-h" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown option `{other}`\n\n{USAGE}")),
            }
        }
        o.seeds = seeds.unwrap_or(if o.quick { 1 } else { 5 });
        o.full_grid = grid.unwrap_or(!o.quick);
        if o.seeds == 0 {
            return Err("--seeds must be at least 1".into());
        }
        Ok(o)
    }

    /// The data sizes of this mode.
    pub fn sizes(&self) -> Sizes {
        if self.quick {
            Sizes::QUICK
        } else {
            Sizes::FULL
        }
    }
}

/// One row of a table: a method's test accuracy on every task, per seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The method as printed.
    pub label: String,
    /// What the row is.
    pub kind: RowKind,
    /// `acc[seed][task]`: test accuracy.
    pub acc: Vec<Vec<f64>>,
    /// `val[seed][task]`: validation accuracy (empty for rows not merged).
    pub val: Vec<Vec<f64>>,
}

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// Not a merge (fine-tuned models, the ancestor, the receiver alone).
    Reference,
    /// A baseline method.
    Baseline,
    /// SAFE-M at the SPEC defaults.
    SafeMSpec,
    /// SAFE-M with one stage of SPEC §1 removed.
    Ablation,
    /// A SAFE-M variant of the grid (chosen among on validation).
    Variant,
    /// A library preset.
    Preset,
    /// FAM (the heterogeneous pair).
    Fam,
    /// Least-squares merging (RegMean, SPEC §7), label-free.
    LeastSquares,
    /// Data-free subspace merging (SPEC §8).
    Subspace,
}

/// One table: a merge case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Title.
    pub title: String,
    /// What the case is.
    pub note: String,
    /// Indices of the tasks evaluated (into the suite's tasks).
    pub tasks: Vec<usize>,
    /// The rows, in print order.
    pub rows: Vec<Row>,
}

/// What one task looked like, per seed.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInfo {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Classes.
    pub classes: usize,
    /// `lr × epochs` of its fine-tuning.
    pub schedule: String,
    /// Share of the majority class in the test split, per seed.
    pub majority: Vec<f64>,
    /// Test accuracy of the fine-tuned model, per seed.
    pub finetuned: Vec<f64>,
    /// Validation accuracy of the fine-tuned model, per seed.
    pub finetuned_val: Vec<f64>,
    /// Test accuracy of the ancestor body with the task's fine-tuned head.
    pub ancestor: Vec<f64>,
    /// `‖τ‖ / ‖C‖` of the body, per seed.
    pub update: Vec<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The options (mode, seeds).
    pub options: Options,
    /// The seeds run.
    pub seeds: Vec<u64>,
    /// Example counts.
    pub sizes: Sizes,
    /// Per-task facts.
    pub tasks: Vec<TaskInfo>,
    /// Ancestor's pre-training test accuracy, per seed.
    pub pretrain_acc: Vec<f64>,
    /// The merge cases.
    pub cases: Vec<Case>,
    /// Free-form per-seed notes (chosen λ, alignment recovery, masks).
    pub notes: Vec<String>,
    /// What SPEC §1's stages keep of the contributor (tasks 1 + 2): per
    /// score form (`sas`, `ratio`), per seed.
    pub diagnoses: Vec<Vec<variants::Diagnosis>>,
    /// The variant with the highest mean normalised *validation* accuracy
    /// over every homologous case and seed.
    pub chosen: Option<String>,
}

/// The fine-tuned models of one seed.
struct Models {
    ancestor: Net,
    finetuned: Vec<Net>,
}

/// Test accuracy of `body` with `head` on `data`, by the library's MLP.
fn eval(body: &[Dense], head: &Dense, data: &nn::Data) -> f64 {
    accuracy(&Net::with_head(body, head).to_mlp(), data)
}

/// `‖τ‖ / ‖C‖` over the body.
fn relative_update(ft: &[Dense], c: &[Dense]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in ft.iter().zip(c) {
        for (x, y) in a.w.iter().chain(&a.b).zip(b.w.iter().chain(&b.b)) {
            num += ((x - y) as f64).powi(2);
        }
        den += b.sq_norm();
    }
    (num / den).sqrt()
}

fn majority(data: &nn::Data, classes: usize) -> f64 {
    let mut counts = vec![0usize; classes];
    for &y in &data.y {
        counts[y] += 1;
    }
    *counts.iter().max().unwrap_or(&0) as f64 / data.len().max(1) as f64
}

fn train_models(seed: u64, suite: &tasks::Suite, log: &dyn Fn(&str)) -> Models {
    let mut rng = Rng::new(seed, "quality init ancestor");
    let mut ancestor = Net::init(&WIDTHS, suite.pretrain_classes, Activation::Gelu, &mut rng);
    let t = Instant::now();
    let loss = nn::train(
        &mut ancestor,
        &suite.pretrain,
        &suite.pretrain_config,
        seed,
        "quality train ancestor",
    );
    log(&format!(
        "  ancestor trained (loss {loss:.3}, {:.1}s)",
        t.elapsed().as_secs_f64()
    ));
    let finetuned = suite
        .tasks
        .iter()
        .map(|task| {
            let mut rng = Rng::new(seed, &format!("quality init head {}", task.name));
            let head = Dense::init(
                *WIDTHS.last().unwrap(),
                task.classes,
                Activation::None,
                0.5,
                &mut rng,
            );
            let mut net = Net::with_head(ancestor.body(), &head);
            let t = Instant::now();
            let loss = nn::train(
                &mut net,
                &task.train,
                &task.train_config,
                seed,
                &format!("quality train {}", task.name),
            );
            log(&format!(
                "  fine-tuned {} (loss {loss:.3}, {:.1}s)",
                task.name,
                t.elapsed().as_secs_f64()
            ));
            net
        })
        .collect();
    Models {
        ancestor,
        finetuned,
    }
}

/// A seed's results: the rows of each case (same order as the cases), task facts, notes.
struct SeedResult {
    cases: Vec<Vec<SeedRow>>,
    finetuned_val: Vec<f64>,
    diagnoses: Vec<variants::Diagnosis>,
    majority: Vec<f64>,
    finetuned: Vec<f64>,
    ancestor: Vec<f64>,
    update: Vec<f64>,
    pretrain_acc: f64,
    notes: Vec<String>,
}

/// Accuracy on `split` of every task in `which` with its own head on `body`.
fn accs(body: &[Dense], models: &Models, tasks: &[Task], which: &[usize], val: bool) -> Vec<f64> {
    which
        .iter()
        .map(|&t| {
            let data = if val { &tasks[t].val } else { &tasks[t].test };
            eval(body, models.finetuned[t].head(), data)
        })
        .collect()
}

/// The homologous cases: task indices, the receiver first.
pub const HOMOLOGOUS: [&[usize]; 3] = [&[0, 1], &[0, 1, 2], &[1, 0]];

/// What a homologous case needs of its seed.
struct CaseContext<'a> {
    seed: u64,
    models: &'a Models,
    tasks: &'a [Task],
    template: &'a [Dense],
    c_dir: &'a Path,
    c_stats: &'a Path,
    t_dirs: &'a [PathBuf],
    t_stats: &'a [PathBuf],
    /// Each fine-tuned model's Grams over its own task's probe examples.
    own_grams: &'a [PathBuf],
    /// Each fine-tuned model's Grams over the whole meta-probe.
    shared_grams: &'a [PathBuf],
    /// The meta-probe (RegMean++ re-runs the models on it).
    probe: &'a Path,
    finetuned: &'a [f64],
    ancestor_acc: &'a [f64],
    grid: &'a [variants::Setting],
}

/// One row of one seed: test and validation accuracy of every task.
#[derive(Debug, Clone)]
struct SeedRow {
    label: String,
    kind: RowKind,
    test: Vec<f64>,
    val: Vec<f64>,
}

fn fixed_row(label: &str, kind: RowKind, test: Vec<f64>) -> SeedRow {
    SeedRow {
        label: label.to_string(),
        kind,
        test,
        val: Vec::new(),
    }
}

/// Every baseline, SAFE-M at the SPEC defaults, its ablations and the
/// variant grid on one homologous case.
fn homologous_case(
    ctx: &CaseContext<'_>,
    which: &[usize],
    merger: &mut Merger,
    notes: &mut Vec<String>,
) -> Result<Vec<SeedRow>, String> {
    let (seed, models, tasks) = (ctx.seed, ctx.models, ctx.tasks);
    let k = which.len();
    let case = case_tag(which);
    let paths: Vec<&Path> = which.iter().map(|&t| ctx.t_dirs[t].as_path()).collect();
    let with_stats: Vec<(&Path, &Path)> = which
        .iter()
        .map(|&t| (ctx.t_dirs[t].as_path(), ctx.t_stats[t].as_path()))
        .collect();
    let mut rows = vec![
        fixed_row(
            "fine-tuned (each task's own model)",
            RowKind::Reference,
            which.iter().map(|&t| ctx.finetuned[t]).collect(),
        ),
        fixed_row(
            "ancestor body (λ = 0)",
            RowKind::Reference,
            which.iter().map(|&t| ctx.ancestor_acc[t]).collect(),
        ),
        fixed_row(
            &format!("receiver's body alone (task-{} model)", which[0] + 1),
            RowKind::Reference,
            accs(
                models.finetuned[which[0]].body(),
                models,
                tasks,
                which,
                false,
            ),
        ),
    ];
    let merge_row = |rows: &mut Vec<SeedRow>,
                     merger: &mut Merger,
                     kind: RowKind,
                     label: &str,
                     yaml: String|
     -> Result<merges::Merged, String> {
        let m = merger.run(&format!("{case}-{label}"), &yaml, ctx.template)?;
        rows.push(SeedRow {
            label: label.to_string(),
            kind,
            test: accs(&m.body, models, tasks, which, false),
            val: accs(&m.body, models, tasks, which, true),
        });
        Ok(m)
    };
    let base = Some(ctx.c_dir);
    let baselines: [(&str, &str, Option<&Path>, &[&str]); 6] = [
        ("linear (plain average)", "linear", None, &[]),
        (
            "task_arithmetic λ = 1",
            "task_arithmetic",
            base,
            &["lambda: 1.0"],
        ),
        (
            "task_arithmetic λ = 0.4",
            "task_arithmetic",
            base,
            &["lambda: 0.4"],
        ),
        (
            "ties (density 0.2, λ = 1)",
            "ties",
            base,
            &["density: 0.2", "lambda: 1.0"],
        ),
        (
            "dare_ties (density 0.5, λ = 1)",
            "dare_ties",
            base,
            &["density: 0.5", "lambda: 1.0"],
        ),
        (
            "dare_linear (density 0.5, λ = 1)",
            "dare_linear",
            base,
            &["density: 0.5", "lambda: 1.0"],
        ),
    ];
    for (label, method, base, params) in baselines {
        merge_row(
            &mut rows,
            merger,
            RowKind::Baseline,
            label,
            baseline_yaml(method, base, &paths, params),
        )?;
    }
    // λ tuned on the validation split: mean normalised validation accuracy.
    let val_ft: Vec<f64> = which
        .iter()
        .map(|&t| {
            eval(
                models.finetuned[t].body(),
                models.finetuned[t].head(),
                &tasks[t].val,
            )
        })
        .collect();
    let mut best: Option<(f64, f64, Vec<Dense>)> = None;
    for &lambda in &LAMBDA_GRID {
        let yaml = baseline_yaml(
            "task_arithmetic",
            base,
            &paths,
            &[&format!("lambda: {lambda}")],
        );
        let m = merger.run(&format!("{case}-ta-grid-{lambda}"), &yaml, ctx.template)?;
        let v = accs(&m.body, models, tasks, which, true);
        let score = v.iter().zip(&val_ft).map(|(a, f)| a / f).sum::<f64>() / k as f64;
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, lambda, m.body));
        }
    }
    let (_, lambda, body) = best.expect("a grid");
    notes.push(format!(
        "seed {seed}, case {case}: task_arithmetic λ chosen on validation = {lambda}"
    ));
    rows.push(SeedRow {
        label: TA_TUNED.into(),
        kind: RowKind::Baseline,
        test: accs(&body, models, tasks, which, false),
        val: accs(&body, models, tasks, which, true),
    });
    // Data-free subspace merging (SPEC §8): each method at α = 1, and with
    // α chosen on the validation split as task arithmetic's λ is.
    for &(method, label, tuned) in SUBSPACE {
        merge_row(
            &mut rows,
            merger,
            RowKind::Subspace,
            label,
            baseline_yaml(method, base, &paths, &[]),
        )?;
        let mut best: Option<(f64, f64, Vec<Dense>)> = None;
        for &alpha in &ALPHA_GRID {
            let yaml = baseline_yaml(method, base, &paths, &[&format!("alpha: {alpha}")]);
            let m = merger.run(
                &format!("{case}-{method}-grid-{alpha}"),
                &yaml,
                ctx.template,
            )?;
            let v = accs(&m.body, models, tasks, which, true);
            let score = v.iter().zip(&val_ft).map(|(a, f)| a / f).sum::<f64>() / k as f64;
            if best.as_ref().is_none_or(|b| score > b.0) {
                best = Some((score, alpha, m.body));
            }
        }
        let (_, alpha, body) = best.expect("a grid");
        notes.push(format!(
            "seed {seed}, case {case}: {method} α chosen on validation = {alpha}"
        ));
        rows.push(SeedRow {
            label: tuned.into(),
            kind: RowKind::Subspace,
            test: accs(&body, models, tasks, which, false),
            val: accs(&body, models, tasks, which, true),
        });
    }
    // Least-squares merging (SPEC §7) under both Gram protocols.
    for (protocol, grams) in [
        (REGMEAN_OWN, ctx.own_grams),
        (REGMEAN_SHARED, ctx.shared_grams),
    ] {
        let models: Vec<(&Path, &Path)> = which
            .iter()
            .map(|&t| (ctx.t_dirs[t].as_path(), grams[t].as_path()))
            .collect();
        merge_row(
            &mut rows,
            merger,
            RowKind::LeastSquares,
            protocol,
            regmean_yaml(&models, &[]),
        )?;
    }
    let own: Vec<(&Path, &Path)> = which
        .iter()
        .map(|&t| (ctx.t_dirs[t].as_path(), ctx.own_grams[t].as_path()))
        .collect();
    merge_row(
        &mut rows,
        merger,
        RowKind::LeastSquares,
        REGMEAN_PP_OWN,
        regmean_yaml(&own, &[]).replacen(
            "merge_method: regmean\n",
            &format!(
                "merge_method: regmean_plusplus\nprobe_set: {}\n",
                merges::q(ctx.probe)
            ),
            1,
        ),
    )?;
    let safe_m = |extra: &[String]| {
        let mut y = safe_m_yaml((ctx.c_dir, ctx.c_stats), &with_stats, "sas");
        if extra
            .iter()
            .any(|l| l == "reproject: gram" || l == "preset: gram")
        {
            // Means from the meta-probe, Grams from each model's own task.
            for &t in which {
                let stats = format!("    stats: {}\n", merges::q(&ctx.t_stats[t]));
                let grams = format!("{stats}    grams: {}\n", merges::q(&ctx.own_grams[t]));
                y = y.replacen(&stats, &grams, 1);
            }
        }
        for line in extra {
            y += &format!("  {line}\n");
        }
        y
    };
    for score in ["sas", "ratio"] {
        let m = merge_row(
            &mut rows,
            merger,
            RowKind::SafeMSpec,
            &format!("safe_m, score {score} (SPEC defaults)"),
            safe_m_yaml((ctx.c_dir, ctx.c_stats), &with_stats, score),
        )?;
        notes.push(format!(
            "seed {seed}, case {case}, safe_m {score}: {}",
            mask_note(&m, k - 1, which)
        ));
    }
    // Ablations: each stage of SPEC §1 removed in turn.
    for a in variants::ablations() {
        let m = merge_row(
            &mut rows,
            merger,
            RowKind::Ablation,
            &format!("safe_m sas, {}", a.label),
            safe_m(&a.params),
        )?;
        notes.push(format!(
            "seed {seed}, case {case}, safe_m sas, {}: {}",
            a.label,
            mask_note(&m, k - 1, which)
        ));
    }
    for v in ctx.grid {
        merge_row(
            &mut rows,
            merger,
            RowKind::Variant,
            &format!("{VARIANT_PREFIX}{}", v.label),
            safe_m(&v.params),
        )?;
    }
    for preset in PRESETS {
        merge_row(
            &mut rows,
            merger,
            RowKind::Preset,
            &format!("safe_m preset: {preset}"),
            safe_m(&[format!("preset: {preset}")]),
        )?;
    }
    Ok(rows)
}

/// `1+2`, `1+2+3`, … (1-based task numbers, receiver first).
pub fn case_tag(which: &[usize]) -> String {
    which
        .iter()
        .map(|t| (t + 1).to_string())
        .collect::<Vec<_>>()
        .join("+")
}

/// Label of the baseline tuned on validation.
pub const TA_TUNED: &str = "task_arithmetic, λ tuned on validation (labels)";

/// The data-free subspace methods (SPEC §8): `(method, row at α = 1, row
/// with α chosen on validation)`.
pub const SUBSPACE: &[(&str, &str, &str)] = &[
    (
        "tsv",
        "tsv (TSV-M, α = 1)",
        "tsv, α tuned on validation (labels)",
    ),
    (
        "iso_c",
        "iso_c (α = 1)",
        "iso_c, α tuned on validation (labels)",
    ),
    (
        "iso_cts",
        "iso_cts (common space 0.8, α = 1)",
        "iso_cts, α tuned on validation (labels)",
    ),
    (
        "wudi",
        "wudi (closed form, α = 1)",
        "wudi, α tuned on validation (labels)",
    ),
];

/// The α grid of the subspace methods' validation choice.
pub const ALPHA_GRID: [f64; 7] = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0];

/// RegMean with each model's Grams over its own task's probe examples.
pub const REGMEAN_OWN: &str = "regmean, own-task Grams (α = 0.9)";

/// RegMean with every model's Grams over the shared meta-probe.
pub const REGMEAN_SHARED: &str = "regmean, shared meta-probe Grams (α = 0.9)";

/// RegMean++ with each model re-run on its own task's probe examples
/// through the layers merged before each layer.
pub const REGMEAN_PP_OWN: &str = "regmean_plusplus, own-task Grams (α = 0.9)";

/// FAM with the least-squares fusion from own-task Grams.
pub const FAM_LS: &str = "fam (fusion: least_squares, own-task Grams)";

/// RegMean of the unpermuted pair, the reference of [`FAM_LS`].
pub const FAM_LS_REFERENCE: &str = "reference: regmean of the unpermuted pair (own-task Grams)";

/// Prefix of the variant-grid rows.
pub const VARIANT_PREFIX: &str = "safe_m variant: ";

/// The library's SAFE-M presets other than `spec` (one row each).
pub const PRESETS: &[&str] = &["keep_all", "gram"];

fn run_seed(seed: u64, opts: &Options, dir: &Path) -> Result<SeedResult, String> {
    let verbose = opts.verbose;
    let log = move |s: &str| {
        if verbose {
            eprintln!("{s}");
        }
    };
    let sizes = opts.sizes();
    let suite = tasks::suite(seed, &sizes);
    let models = train_models(seed, &suite, &log);
    let tasks = &suite.tasks;
    let n_tasks = tasks.len();
    let pretrain_acc = accuracy(&models.ancestor.to_mlp(), &suite.pretrain_test);

    // Checkpoints: the ancestor's body, the fine-tuned bodies, a permuted task-2 body.
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let c_dir = dir.join("C");
    merges::save_body(models.ancestor.body(), &c_dir)?;
    let t_dirs: Vec<PathBuf> = (0..n_tasks)
        .map(|t| dir.join(format!("T{}", t + 1)))
        .collect();
    for (net, d) in models.finetuned.iter().zip(&t_dirs) {
        merges::save_body(net.body(), d)?;
    }
    let mut prng = Rng::new(seed, "quality permutation");
    let perms: Vec<Vec<usize>> = WIDTHS[1..]
        .iter()
        .map(|&n| {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = ((prng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
                p.swap(i, j);
            }
            p
        })
        .collect();
    let permuted = merges::permute(&models.finetuned[1], &perms);
    let p_dir = dir.join("T2-permuted");
    merges::save_body(permuted.body(), &p_dir)?;

    // Statistics: the native probe on the meta-probe mixture.
    let probe_path = dir.join("probe.jsonl");
    let probe_n = merges::write_probe(tasks, sizes.probe, seed, &probe_path)?;
    let t = Instant::now();
    let c_stats = merges::probe(&c_dir, &probe_path, opts.threads)?;
    let t_stats: Vec<PathBuf> = t_dirs
        .iter()
        .map(|d| merges::probe(d, &probe_path, opts.threads))
        .collect::<Result<_, _>>()?;
    let p_stats = merges::probe(&p_dir, &probe_path, opts.threads)?;
    let p_own = merges::probe_gram(
        &p_dir,
        &probe_path,
        Some(&[tasks[1].name.to_string()]),
        "own",
        opts.threads,
    )?;
    let own_grams: Vec<PathBuf> = t_dirs
        .iter()
        .zip(tasks)
        .map(|(d, task)| {
            let own = [task.name.to_string()];
            merges::probe_gram(d, &probe_path, Some(&own), "own", opts.threads)
        })
        .collect::<Result<_, _>>()?;
    let shared_grams: Vec<PathBuf> = t_dirs
        .iter()
        .map(|d| merges::probe_gram(d, &probe_path, None, "shared", opts.threads))
        .collect::<Result<_, _>>()?;
    log(&format!(
        "  probed 5 models on {probe_n} examples, Grams of 3 by two protocols ({:.1}s)",
        t.elapsed().as_secs_f64()
    ));

    let mut notes = Vec::new();
    let finetuned: Vec<f64> = (0..n_tasks)
        .map(|t| {
            eval(
                models.finetuned[t].body(),
                models.finetuned[t].head(),
                &tasks[t].test,
            )
        })
        .collect();
    let permuted_acc = eval(permuted.body(), permuted.head(), &tasks[1].test);
    if (permuted_acc - finetuned[1]).abs() > 2.0 / tasks[1].test.len() as f64 {
        return Err(format!(
            "the permuted task-2 model scores {permuted_acc}, the original {}: the permutation is wrong",
            finetuned[1]
        ));
    }
    let ancestor_acc = accs(
        models.ancestor.body(),
        &models,
        tasks,
        &(0..n_tasks).collect::<Vec<_>>(),
        false,
    );
    let update: Vec<f64> = models
        .finetuned
        .iter()
        .map(|n| relative_update(n.body(), models.ancestor.body()))
        .collect();

    let mut merger = Merger::new(dir.join("merges"), opts.threads, seed);
    let mut grid = variants::grid(opts.full_grid);
    grid.extend(variants::gram_grid(opts.full_grid));
    let template = models.ancestor.body().to_vec();
    let t = Instant::now();
    let mut cases = Vec::new();

    // Homologous cases (receiver first): tasks 1 + 2, 1 + 2 + 3, and the
    // small-update task as the receiver, 2 + 1 (SAFE-M is not symmetric).
    let ctx = CaseContext {
        seed,
        models: &models,
        tasks,
        template: &template,
        c_dir: &c_dir,
        c_stats: &c_stats,
        t_dirs: &t_dirs,
        t_stats: &t_stats,
        own_grams: &own_grams,
        shared_grams: &shared_grams,
        probe: &probe_path,
        finetuned: &finetuned,
        ancestor_acc: &ancestor_acc,
        grid: &grid,
    };
    for which in HOMOLOGOUS {
        cases.push(homologous_case(&ctx, which, &mut merger, &mut notes)?);
    }
    // What SPEC §1's stages keep of the contributor (tasks 1 + 2), both score forms.
    let diagnoses = [
        ScoreForm::Sas { alpha: 1.0 },
        ScoreForm::Ratio { epsilon: 1e-8 },
    ]
    .iter()
    .map(|&form| {
        variants::diagnose(
            (models.finetuned[0].body(), &t_stats[0]),
            (models.finetuned[1].body(), &t_stats[1]),
            (models.ancestor.body(), &c_stats),
            form,
        )
    })
    .collect::<Result<Vec<_>, _>>()?;

    // Heterogeneous pair: task 1 and the neuron-permuted task-2 model.
    {
        let mut rows: Vec<SeedRow> = Vec::new();
        rows.push(fixed_row(
            "fine-tuned (each task's own model)",
            RowKind::Reference,
            vec![finetuned[0], finetuned[1]],
        ));
        let pair_acc = |body: &[Dense], head2: &Dense| {
            vec![
                eval(body, models.finetuned[0].head(), &tasks[0].test),
                eval(body, head2, &tasks[1].test),
            ]
        };
        let m = merger.run(
            "het-reference",
            &baseline_yaml("linear", None, &[&t_dirs[0], &t_dirs[1]], &[]),
            &template,
        )?;
        rows.push(fixed_row(
            "reference: linear of the unpermuted pair",
            RowKind::Reference,
            pair_acc(&m.body, models.finetuned[1].head()),
        ));
        let m = merger.run(
            "het-naive",
            &baseline_yaml("linear", None, &[&t_dirs[0], &p_dir], &[]),
            &template,
        )?;
        rows.push(fixed_row(
            "naive: linear of the permuted pair",
            RowKind::Baseline,
            pair_acc(&m.body, permuted.head()),
        ));
        let m = merger.run(
            "het-regmean-reference",
            &regmean_yaml(
                &[(&t_dirs[0], &own_grams[0]), (&t_dirs[1], &own_grams[1])],
                &[],
            ),
            &template,
        )?;
        rows.push(fixed_row(
            FAM_LS_REFERENCE,
            RowKind::Reference,
            pair_acc(&m.body, models.finetuned[1].head()),
        ));
        let fam_rows: [(&str, FamGroups, &[&str]); 5] = [
            ("fam (defaults)", FamGroups::Explicit, &[]),
            (
                "fam (preset sketch)",
                FamGroups::Explicit,
                &["preset: sketch"],
            ),
            (
                "fam (lambda_search)",
                FamGroups::Explicit,
                &["lambda_search: true"],
            ),
            (
                "fam (defaults, groups: sequential)",
                FamGroups::Sequential,
                &[],
            ),
            (FAM_LS, FamGroups::Explicit, &["fusion: least_squares"]),
        ];
        for (label, groups, params) in fam_rows {
            let mut yaml = fam_yaml(
                (&t_dirs[0], &t_stats[0]),
                (&p_dir, &p_stats),
                WIDTHS.len() - 1,
                groups,
                params,
            );
            if label == FAM_LS {
                // Rows and means from the meta-probe, Grams from each model's own task.
                for (stats, grams) in [(&t_stats[0], &own_grams[0]), (&p_stats, &p_own)] {
                    let line = format!("    stats: {}\n", merges::q(stats));
                    yaml = yaml.replacen(
                        &line,
                        &format!("{line}    grams: {}\n", merges::q(grams)),
                        1,
                    );
                }
            }
            let m = merger.run(&format!("het-{label}"), &yaml, &template)?;
            // The task-2 head reads the merged body in A's basis: re-index its
            // columns by the alignment FAM found for the last hidden layer.
            let last = format!("body.{}", WIDTHS.len() - 2);
            let head2 = match m.alignments.iter().find(|a| a.name == last) {
                Some(a) => merges::remap_head(permuted.head(), &a.matching),
                None => permuted.head().clone(),
            };
            rows.push(fixed_row(label, RowKind::Fam, pair_acc(&m.body, &head2)));
            let recovery: Vec<String> = m
                .alignments
                .iter()
                .map(|a| {
                    let k: usize = a.name.trim_start_matches("body.").parse().unwrap_or(0);
                    // A's neuron i is B's original neuron i, now at position perm⁻¹(i).
                    let mut inverse = vec![0; perms[k].len()];
                    for (pos, &orig) in perms[k].iter().enumerate() {
                        inverse[orig] = pos;
                    }
                    let hit = a
                        .matching
                        .iter()
                        .enumerate()
                        .filter(|(i, m)| **m == Some(inverse[*i]))
                        .count();
                    let fused = a.fused.iter().filter(|f| **f).count();
                    format!(
                        "{} recovered {}/{} (fused {}/{})",
                        a.name,
                        hit,
                        a.matching.len(),
                        fused,
                        a.fused.len()
                    )
                })
                .collect();
            let mut note = format!("seed {seed}, {label}: {}", recovery.join(", "));
            if let Some(f) = m.summary.report.results.get("fam") {
                if params.contains(&"lambda_search: true") {
                    let _ = write!(
                        note,
                        "; λ chosen: proj {} ortho {}",
                        f["lambda_proj"], f["lambda_ortho"]
                    );
                }
            }
            notes.push(note);
        }
        cases.push(rows);
    }
    log(&format!(
        "  {} merges ({:.1}s)",
        merger_count(&merger),
        t.elapsed().as_secs_f64()
    ));

    Ok(SeedResult {
        cases,
        finetuned_val: (0..n_tasks)
            .map(|t| {
                eval(
                    models.finetuned[t].body(),
                    models.finetuned[t].head(),
                    &tasks[t].val,
                )
            })
            .collect(),
        diagnoses,
        majority: tasks.iter().map(|t| majority(&t.test, t.classes)).collect(),
        finetuned,
        ancestor: ancestor_acc,
        update,
        pretrain_acc,
        notes,
    })
}

/// What SAFE-M's masks kept of each contributor (from the merge report).
fn mask_note(m: &merges::Merged, contributors: usize, which: &[usize]) -> String {
    let mut kept = vec![(0u64, 0u64, 0u64); contributors];
    for t in &m.summary.report.tensors {
        for mask in &t.masks {
            if let Some(slot) = kept.get_mut(mask.contributor) {
                slot.0 += mask.kept;
                slot.1 += mask.conflicts;
                slot.2 += t.plan.numel() as u64;
            }
        }
    }
    kept.iter()
        .enumerate()
        .map(|(c, (kp, cf, n))| {
            format!(
                "task {} keeps {:.1}% of its entries ({:.1}% removed as sign conflicts)",
                which[c + 1] + 1,
                100.0 * *kp as f64 / (*n).max(1) as f64,
                100.0 * *cf as f64 / (*n).max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn merger_count(m: &Merger) -> usize {
    std::fs::read_dir(&m.dir).map(|d| d.count()).unwrap_or(0)
}

/// Runs the benchmark.
pub fn run(opts: &Options) -> Result<Report, String> {
    let tmp;
    let root = match &opts.keep {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| format!("a temporary folder: {e}"))?;
            tmp.path().to_path_buf()
        }
    };
    let sizes = opts.sizes();
    let seeds: Vec<u64> = (0..opts.seeds as u64)
        .map(|s| opts.first_seed + s)
        .collect();
    let mut results = Vec::new();
    for &seed in &seeds {
        if opts.verbose {
            eprintln!("seed {seed}");
        }
        results.push(run_seed(seed, opts, &root.join(format!("seed-{seed}")))?);
    }
    let suite = tasks::suite(
        seeds[0],
        &Sizes {
            pretrain: 0,
            train: 0,
            val: 0,
            test: 0,
            probe: 0,
            ..sizes
        },
    );
    let task_info = suite
        .tasks
        .iter()
        .enumerate()
        .map(|(t, task)| TaskInfo {
            name: task.name.to_string(),
            description: task.description.to_string(),
            classes: task.classes,
            schedule: format!(
                "Adam {} × {} epochs",
                task.train_config.lr, task.train_config.epochs
            ),
            majority: results.iter().map(|r| r.majority[t]).collect(),
            finetuned: results.iter().map(|r| r.finetuned[t]).collect(),
            finetuned_val: results.iter().map(|r| r.finetuned_val[t]).collect(),
            ancestor: results.iter().map(|r| r.ancestor[t]).collect(),
            update: results.iter().map(|r| r.update[t]).collect(),
        })
        .collect();
    let mut specs: Vec<(String, String, Vec<usize>)> = HOMOLOGOUS
        .iter()
        .map(|which| {
            let names: Vec<String> = which.iter().map(|t| format!("{}", t + 1)).collect();
            (
                format!(
                    "{} models: tasks {}",
                    if which.len() == 2 { "Two" } else { "Three" },
                    names.join(" + ")
                ),
                format!(
                    "receiver = task {}, contributor{} = task{} {}, ancestor C",
                    which[0] + 1,
                    if which.len() > 2 { "s" } else { "" },
                    if which.len() > 2 { "s" } else { "" },
                    names[1..].join(" and ")
                ),
                which.to_vec(),
            )
        })
        .collect();
    specs.push((
        "Heterogeneous pair: task 1 + neuron-permuted task 2".into(),
        "B = the task-2 model with both hidden layers' neurons permuted (rows of layer i, columns of layer i+1 and of its head), so its own accuracy is unchanged; no ancestor is used".into(),
        vec![0, 1],
    ));
    let cases: Vec<Case> = specs
        .iter()
        .enumerate()
        .map(|(c, (title, note, which))| Case {
            title: title.clone(),
            note: note.clone(),
            tasks: which.clone(),
            rows: results[0].cases[c]
                .iter()
                .enumerate()
                .map(|(r, first)| Row {
                    label: first.label.clone(),
                    kind: first.kind,
                    acc: results.iter().map(|s| s.cases[c][r].test.clone()).collect(),
                    val: results.iter().map(|s| s.cases[c][r].val.clone()).collect(),
                })
                .collect(),
        })
        .collect();
    let mut report = Report {
        options: opts.clone(),
        seeds,
        sizes,
        tasks: task_info,
        pretrain_acc: results.iter().map(|r| r.pretrain_acc).collect(),
        cases,
        notes: Vec::new(),
        diagnoses: (0..2)
            .map(|f| results.iter().map(|r| r.diagnoses[f]).collect())
            .collect(),
        chosen: None,
    };
    report.notes = results.into_iter().flat_map(|r| r.notes).collect();
    report.chosen = report.choose_on_validation();
    Ok(report)
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

fn cell(v: &[f64]) -> String {
    let (m, s) = mean_sd(v);
    if v.len() > 1 {
        format!("{m:.3} ± {s:.3}")
    } else {
        format!("{m:.3}")
    }
}

impl Report {
    /// Normalised accuracies of `row` in `case`: `[seed][task]`, merged ÷ fine-tuned.
    pub fn normalised(&self, case: &Case, row: &Row) -> Vec<Vec<f64>> {
        row.acc
            .iter()
            .enumerate()
            .map(|(s, accs)| {
                accs.iter()
                    .zip(&case.tasks)
                    .map(|(a, &t)| a / self.tasks[t].finetuned[s])
                    .collect()
            })
            .collect()
    }

    /// Mean normalised accuracy of `row` over the case's tasks, per seed.
    pub fn mean_normalised(&self, case: &Case, row: &Row) -> Vec<f64> {
        self.normalised(case, row)
            .iter()
            .map(|n| n.iter().sum::<f64>() / n.len() as f64)
            .collect()
    }

    /// Mean normalised *validation* accuracy of `row`, per seed (empty when
    /// the row has no validation accuracies).
    pub fn mean_normalised_val(&self, case: &Case, row: &Row) -> Vec<f64> {
        row.val
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(s, accs)| {
                accs.iter()
                    .zip(&case.tasks)
                    .map(|(a, &t)| a / self.tasks[t].finetuned_val[s])
                    .sum::<f64>()
                    / accs.len() as f64
            })
            .collect()
    }

    /// The homologous cases (those with SAFE-M rows).
    pub fn homologous(&self) -> impl Iterator<Item = &Case> {
        self.cases
            .iter()
            .filter(|c| c.rows.iter().any(|r| r.kind == RowKind::SafeMSpec))
    }

    /// The variant whose mean normalised validation accuracy, averaged
    /// over the homologous cases and seeds, is highest (the first on a tie).
    pub fn choose_on_validation(&self) -> Option<String> {
        let mut best: Option<(f64, String)> = None;
        let first = self.homologous().next()?;
        for row in first.rows.iter().filter(|r| r.kind == RowKind::Variant) {
            let mut all = Vec::new();
            for case in self.homologous() {
                let r = case.rows.iter().find(|r| r.label == row.label)?;
                all.extend(self.mean_normalised_val(case, r));
            }
            let score = mean_sd(&all).0;
            if best.as_ref().is_none_or(|b| score > b.0) {
                best = Some((score, row.label.clone()));
            }
        }
        best.map(|b| b.1)
    }

    /// The report as markdown tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let o = &self.options;
        let _ = writeln!(
            s,
            "Mode: {}; seeds {:?}; values are mean ± sample standard deviation over the seeds.\n",
            if o.quick { "quick" } else { "full" },
            self.seeds
        );
        let z = &self.sizes;
        let _ = writeln!(
            s,
            "Body 32 → 64 → 64 (GELU), a head per task. Ancestor pre-trained on {} examples \
             (10 classes; test accuracy {}); each task: {} train / {} validation / {} test \
             examples; meta-probe: {} training inputs per task.\n",
            z.pretrain,
            cell(&self.pretrain_acc),
            z.train,
            z.val,
            z.test,
            z.probe
        );
        let _ = writeln!(s, "### Tasks\n");
        let _ = writeln!(
            s,
            "| # | task | classes | fine-tuning | majority class | ancestor body + own head | fine-tuned | ‖τ‖ / ‖C‖ |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for (i, t) in self.tasks.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} — {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                t.name,
                t.description,
                t.classes,
                t.schedule,
                cell(&t.majority),
                cell(&t.ancestor),
                cell(&t.finetuned),
                cell(&t.update)
            );
        }
        for case in &self.cases {
            let _ = writeln!(s, "\n### {}\n\n{}.\n", case.title, case.note);
            let names: Vec<&str> = case
                .tasks
                .iter()
                .map(|&t| self.tasks[t].name.as_str())
                .collect();
            let mut header = String::from("| method |");
            let mut rule = String::from("|---|");
            for n in &names {
                let _ = write!(header, " {n} acc |");
                rule += "---|";
            }
            for n in &names {
                let _ = write!(header, " {n} norm |");
                rule += "---|";
            }
            header += " mean norm |";
            rule += "---|";
            let _ = writeln!(s, "{header}\n{rule}");
            for row in &case.rows {
                if row.kind == RowKind::Variant
                    && self.chosen.as_deref() != Some(row.label.as_str())
                {
                    continue;
                }
                let norm = self.normalised(case, row);
                let mut line = if self.chosen.as_deref() == Some(row.label.as_str()) {
                    format!("| **chosen on validation:** {} |", row.label)
                } else {
                    format!("| {} |", row.label)
                };
                for t in 0..case.tasks.len() {
                    let v: Vec<f64> = row.acc.iter().map(|a| a[t]).collect();
                    let _ = write!(line, " {} |", cell(&v));
                }
                for t in 0..case.tasks.len() {
                    let v: Vec<f64> = norm.iter().map(|a| a[t]).collect();
                    let _ = write!(line, " {} |", cell(&v));
                }
                let _ = write!(line, " **{}** |", cell(&self.mean_normalised(case, row)));
                let _ = writeln!(s, "{line}");
            }
        }
        self.summary_markdown(&mut s);
        self.variants_markdown(&mut s);
        self.diagnoses_markdown(&mut s);
        let _ = writeln!(s, "\n### Notes per seed\n");
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}

/// `mean ± sd (min–max)` of a per-seed series.
fn spread(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({min:.3}–{max:.3})", cell(v))
}

impl Report {
    /// The best baseline of a case by mean test accuracy, and its row.
    fn best_baseline<'a>(&self, case: &'a Case) -> Option<&'a Row> {
        case.rows
            .iter()
            .filter(|r| r.kind == RowKind::Baseline)
            .max_by(|a, b| {
                let m = |r: &Row| mean_sd(&self.mean_normalised(case, r)).0;
                m(a).total_cmp(&m(b))
            })
    }

    /// Per homologous case: the validation-chosen variant, the presets and
    /// SPEC SAFE-M against the best baseline, with the spread over seeds.
    fn summary_markdown(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n### Summary: RegMean and SAFE-M against the best baseline (test split, mean normalised accuracy)\n"
        );
        if let Some(c) = &self.chosen {
            let _ = writeln!(
                s,
                "Chosen on the validation split (mean over every homologous case and seed): `{c}`.\n"
            );
        }
        let _ = writeln!(
            s,
            "| case | best baseline | its score | regmean, own-task Grams | regmean − best baseline, per seed | safe_m SPEC (sas) | chosen variant | chosen − best baseline, per seed |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for case in self.homologous() {
            let Some(best) = self.best_baseline(case) else {
                continue;
            };
            let b = self.mean_normalised(case, best);
            let find = |label: &str| case.rows.iter().find(|r| r.label == label);
            let spec = find("safe_m, score sas (SPEC defaults)")
                .map(|r| spread(&self.mean_normalised(case, r)))
                .unwrap_or_default();
            let against_best = |row: Option<&Row>| match row {
                Some(r) => {
                    let c = self.mean_normalised(case, r);
                    let d: Vec<f64> = c.iter().zip(&b).map(|(x, y)| x - y).collect();
                    (spread(&c), spread(&d))
                }
                None => ("–".into(), "–".into()),
            };
            let (regmean, regmean_diff) = against_best(find(REGMEAN_OWN));
            let (chosen, diff) = against_best(self.chosen.as_deref().and_then(find));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {regmean} | {regmean_diff} | {spec} | {chosen} | {diff} |",
                case.title,
                best.label,
                spread(&b)
            );
        }
    }

    /// Every variant of the grid on every homologous case.
    fn variants_markdown(&self, s: &mut String) {
        let cases: Vec<&Case> = self.homologous().collect();
        let Some(first) = cases.first() else {
            return;
        };
        let _ = writeln!(
            s,
            "\n### SAFE-M variants (mean normalised accuracy: validation mean; test mean ± sd)\n"
        );
        let mut header = String::from("| variant | val, all cases |");
        let mut rule = String::from("|---|---|");
        for c in &cases {
            let _ = write!(
                header,
                " val {} | test {} |",
                case_tag(&c.tasks),
                case_tag(&c.tasks)
            );
            rule += "---|---|";
        }
        let _ = writeln!(s, "{header}\n{rule}");
        let labels = first.rows.iter().filter(|r| {
            matches!(
                r.kind,
                RowKind::SafeMSpec
                    | RowKind::Ablation
                    | RowKind::Variant
                    | RowKind::Preset
                    | RowKind::Baseline
                    | RowKind::LeastSquares
                    | RowKind::Subspace
            )
        });
        for row in labels {
            let mut all = Vec::new();
            let mut cells = String::new();
            for case in &cases {
                match case.rows.iter().find(|r| r.label == row.label) {
                    Some(r) => {
                        let v = self.mean_normalised_val(case, r);
                        all.extend(v.iter().copied());
                        let _ = write!(
                            cells,
                            " {:.3} | {} |",
                            mean_sd(&v).0,
                            cell(&self.mean_normalised(case, r))
                        );
                    }
                    None => cells += " – | – |",
                }
            }
            let label = row.label.trim_start_matches(VARIANT_PREFIX);
            let _ = writeln!(s, "| {label} | {:.3} |{cells}", mean_sd(&all).0);
        }
    }

    /// What SPEC §1's stages keep of the contributor.
    fn diagnoses_markdown(&self, s: &mut String) {
        if self.diagnoses.iter().all(|d| d.is_empty()) {
            return;
        }
        let _ = writeln!(
            s,
            "\n### Diagnosis: what SAFE-M (SPEC defaults) keeps of the contributor, tasks 1 + 2\n\n\
             Body weights (`body.0`, `body.1`), summed; mean ± sd over the seeds.\n"
        );
        let _ = writeln!(s, "| measure | sas | ratio |\n|---|---|---|");
        type Get = fn(&variants::Diagnosis) -> f64;
        let measures: [(&str, Get); 8] = [
            (
                "‖τ_B ⊙ M_B‖² / ‖τ_B‖² (after the election, k = 0.2)",
                |d| d.elected,
            ),
            (
                "‖τ_B ⊙ M'_B‖² / ‖τ_B‖² (after the conflict removal)",
                |d| d.kept,
            ),
            ("‖P + 0.5·O‖² / ‖τ_B‖² (what is added)", |d| {
                d.added
            }),
            ("‖P‖² / ‖τ_u‖² (share along x̄_A)", |d| {
                d.along_mean
            }),
            ("share of B's elected entries with τ_A·τ_B < 0", |d| {
                d.opposite
            }),
            ("top-20 % overlap: S_B vs \\|τ_B\\| (random 0.2)", |d| {
                d.overlap_tau
            }),
            ("top-20 % overlap: S_B vs \\|W_B\\|", |d| d.overlap_weight),
            (
                "top-20 % overlap: S_B vs \\|τ_B ⊙ g'_B\\| (task-vector salience)",
                |d| d.overlap_tau_salience,
            ),
        ];
        for (label, get) in measures {
            let col = |f: usize| {
                let v: Vec<f64> = self.diagnoses[f].iter().map(get).collect();
                cell(&v)
            };
            let _ = writeln!(s, "| {label} | {} | {} |", col(0), col(1));
        }
    }
}
