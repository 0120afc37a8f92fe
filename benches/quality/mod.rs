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

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flatmerge::demo::Rng;
use flatmerge::probe::mlp::Activation;

use merges::{baseline_yaml, fam_yaml, safe_m_yaml, FamGroups, Merger};
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
                "--help" | "-h" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown option `{other}`\n\n{USAGE}")),
            }
        }
        o.seeds = seeds.unwrap_or(if o.quick { 1 } else { 5 });
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
    /// `acc[seed][task]`.
    pub acc: Vec<Vec<f64>>,
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
    cases: Vec<Vec<(String, Vec<f64>)>>,
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
    log(&format!(
        "  probed 5 models on {probe_n} examples ({:.1}s)",
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
    let template = models.ancestor.body().to_vec();
    let t = Instant::now();
    let mut cases = Vec::new();

    // Homologous cases: tasks 1 + 2, then 1 + 2 + 3.
    for k in [2usize, 3] {
        let which: Vec<usize> = (0..k).collect();
        let paths: Vec<&Path> = t_dirs[..k].iter().map(PathBuf::as_path).collect();
        let with_stats: Vec<(&Path, &Path)> = t_dirs[..k]
            .iter()
            .zip(&t_stats[..k])
            .map(|(m, s)| (m.as_path(), s.as_path()))
            .collect();
        let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
        rows.push((
            "fine-tuned (each task's own model)".into(),
            which.iter().map(|&t| finetuned[t]).collect(),
        ));
        rows.push((
            "ancestor body (λ = 0)".into(),
            which.iter().map(|&t| ancestor_acc[t]).collect(),
        ));
        rows.push((
            "receiver's body alone (task-1 model)".into(),
            accs(models.finetuned[0].body(), &models, tasks, &which, false),
        ));
        let merge_row = |rows: &mut Vec<(String, Vec<f64>)>,
                         merger: &mut Merger,
                         label: &str,
                         yaml: String|
         -> Result<merges::Merged, String> {
            let m = merger.run(&format!("{k}-{label}"), &yaml, &template)?;
            rows.push((
                label.to_string(),
                accs(&m.body, &models, tasks, &which, false),
            ));
            Ok(m)
        };
        merge_row(
            &mut rows,
            &mut merger,
            "linear (plain average)",
            baseline_yaml("linear", None, &paths, &[]),
        )?;
        merge_row(
            &mut rows,
            &mut merger,
            "task_arithmetic λ = 1",
            baseline_yaml("task_arithmetic", Some(&c_dir), &paths, &["lambda: 1.0"]),
        )?;
        merge_row(
            &mut rows,
            &mut merger,
            "task_arithmetic λ = 0.4",
            baseline_yaml("task_arithmetic", Some(&c_dir), &paths, &["lambda: 0.4"]),
        )?;
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
                Some(&c_dir),
                &paths,
                &[&format!("lambda: {lambda}")],
            );
            let m = merger.run(&format!("{k}-ta-grid-{lambda}"), &yaml, &template)?;
            let v = accs(&m.body, &models, tasks, &which, true);
            let score = v.iter().zip(&val_ft).map(|(a, f)| a / f).sum::<f64>() / k as f64;
            if best.as_ref().is_none_or(|b| score > b.0) {
                best = Some((score, lambda, m.body));
            }
        }
        let (_, lambda, body) = best.expect("a grid");
        notes.push(format!(
            "seed {seed}, {k} models: task_arithmetic λ chosen on validation = {lambda}"
        ));
        rows.push((
            "task_arithmetic, λ tuned on validation".into(),
            accs(&body, &models, tasks, &which, false),
        ));
        merge_row(
            &mut rows,
            &mut merger,
            "ties (density 0.2, λ = 1)",
            baseline_yaml(
                "ties",
                Some(&c_dir),
                &paths,
                &["density: 0.2", "lambda: 1.0"],
            ),
        )?;
        merge_row(
            &mut rows,
            &mut merger,
            "dare_ties (density 0.5, λ = 1)",
            baseline_yaml(
                "dare_ties",
                Some(&c_dir),
                &paths,
                &["density: 0.5", "lambda: 1.0"],
            ),
        )?;
        merge_row(
            &mut rows,
            &mut merger,
            "dare_linear (density 0.5, λ = 1)",
            baseline_yaml(
                "dare_linear",
                Some(&c_dir),
                &paths,
                &["density: 0.5", "lambda: 1.0"],
            ),
        )?;
        for score in ["sas", "ratio"] {
            let m = merge_row(
                &mut rows,
                &mut merger,
                &format!("safe_m, score {score} (SPEC defaults)"),
                safe_m_yaml((&c_dir, &c_stats), &with_stats, score),
            )?;
            notes.push(format!(
                "seed {seed}, {k} models, safe_m {score}: {}",
                mask_note(&m, k - 1)
            ));
        }
        // Diagnostics, not defaults: where SAFE-M's loss on the contributors
        // comes from — the trim (density 1 keeps every scored entry), then
        // the halved orthogonal part (λ_ortho 1); what remains is the
        // removal of entries whose sign conflicts with the receiver's.
        for (label, extra) in [
            ("density 1", "  density: 1.0\n"),
            (
                "density 1, λ_ortho 1",
                "  density: 1.0\n  lambda_ortho: 1.0\n",
            ),
        ] {
            let yaml = safe_m_yaml((&c_dir, &c_stats), &with_stats, "sas") + extra;
            let m = merge_row(
                &mut rows,
                &mut merger,
                &format!("safe_m, score sas, {label} (diagnostic)"),
                yaml,
            )?;
            notes.push(format!(
                "seed {seed}, {k} models, safe_m sas, {label}: {}",
                mask_note(&m, k - 1)
            ));
        }
        cases.push(rows);
    }

    // Heterogeneous pair: task 1 and the neuron-permuted task-2 model.
    {
        let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
        rows.push((
            "fine-tuned (each task's own model)".into(),
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
        rows.push((
            "reference: linear of the unpermuted pair".into(),
            pair_acc(&m.body, models.finetuned[1].head()),
        ));
        let m = merger.run(
            "het-naive",
            &baseline_yaml("linear", None, &[&t_dirs[0], &p_dir], &[]),
            &template,
        )?;
        rows.push((
            "naive: linear of the permuted pair".into(),
            pair_acc(&m.body, permuted.head()),
        ));
        let fam_rows: [(&str, FamGroups, &[&str]); 4] = [
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
        ];
        for (label, groups, params) in fam_rows {
            let yaml = fam_yaml(
                (&t_dirs[0], &t_stats[0]),
                (&p_dir, &p_stats),
                WIDTHS.len() - 1,
                groups,
                params,
            );
            let m = merger.run(&format!("het-{label}"), &yaml, &template)?;
            // The task-2 head reads the merged body in A's basis: re-index its
            // columns by the alignment FAM found for the last hidden layer.
            let last = format!("body.{}", WIDTHS.len() - 2);
            let head2 = match m.alignments.iter().find(|a| a.name == last) {
                Some(a) => merges::remap_head(permuted.head(), &a.matching),
                None => permuted.head().clone(),
            };
            rows.push((label.to_string(), pair_acc(&m.body, &head2)));
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
            if let Some(f) = m.summary.report.fam.as_ref() {
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
        majority: tasks.iter().map(|t| majority(&t.test, t.classes)).collect(),
        finetuned,
        ancestor: ancestor_acc,
        update,
        pretrain_acc,
        notes,
    })
}

/// What SAFE-M's masks kept of each contributor (from the merge report).
fn mask_note(m: &merges::Merged, contributors: usize) -> String {
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
                c + 2,
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
            ancestor: results.iter().map(|r| r.ancestor[t]).collect(),
            update: results.iter().map(|r| r.update[t]).collect(),
        })
        .collect();
    let specs = [
        ("Two models: tasks 1 + 2", "receiver = task 1, contributor = task 2, ancestor C", vec![0, 1]),
        (
            "Three models: tasks 1 + 2 + 3",
            "receiver = task 1, contributors = tasks 2 and 3, ancestor C",
            vec![0, 1, 2],
        ),
        (
            "Heterogeneous pair: task 1 + neuron-permuted task 2",
            "B = the task-2 model with both hidden layers' neurons permuted (rows of layer i, columns of layer i+1 and of its head), so its own accuracy is unchanged; no ancestor is used",
            vec![0, 1],
        ),
    ];
    let cases = specs
        .iter()
        .enumerate()
        .map(|(c, (title, note, which))| Case {
            title: title.to_string(),
            note: note.to_string(),
            tasks: which.clone(),
            rows: results[0].cases[c]
                .iter()
                .enumerate()
                .map(|(r, (label, _))| Row {
                    label: label.clone(),
                    acc: results.iter().map(|s| s.cases[c][r].1.clone()).collect(),
                })
                .collect(),
        })
        .collect();
    Ok(Report {
        options: opts.clone(),
        seeds,
        sizes,
        tasks: task_info,
        pretrain_acc: results.iter().map(|r| r.pretrain_acc).collect(),
        cases,
        notes: results.into_iter().flat_map(|r| r.notes).collect(),
    })
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
                let norm = self.normalised(case, row);
                let mut line = format!("| {} |", row.label);
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
        let _ = writeln!(s, "\n### Notes per seed\n");
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}
