//! Checkpoints, statistics and merges through the library: bodies saved as
//! MLP model directories, the native probe on a meta-probe mixture, merge
//! configs written as YAML and run by the engine, merged bodies read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flatmerge::config::MergeConfig;
use flatmerge::engine::fam::GroupAlignment;
use flatmerge::engine::{MergeOptions, MergeSummary, PreparedMerge};
use flatmerge::io::Checkpoint;
use flatmerge::probe::set::{sample_mixture, write_probe_set, ProbeExample, Quotas};
use flatmerge::probe::{probe_files, ProbeOptions};

use super::nn::{body_mlp, Dense, Net};
use super::tasks::Task;

/// A path as a quoted YAML (JSON) string.
pub fn q(p: &Path) -> String {
    serde_json::Value::String(p.display().to_string()).to_string()
}

/// Saves `body` as an MLP model directory (`body.0`, `body.1`, …).
pub fn save_body(body: &[Dense], dir: &Path) -> Result<(), String> {
    body_mlp(body)
        .save(dir)
        .map_err(|e| format!("saving {}: {e}", dir.display()))
}

/// Writes the meta-probe: `per_task` training inputs of every task, drawn by
/// the library's sampler (quota per task, then shuffled), as JSON Lines.
pub fn write_probe(
    tasks: &[Task],
    per_task: usize,
    seed: u64,
    path: &Path,
) -> Result<usize, String> {
    let mut pool = Vec::new();
    for t in tasks {
        for i in 0..t.train.len() {
            let mut e = ProbeExample::features(t.train.row(i).to_vec());
            e.source = t.name.to_string();
            pool.push(e);
        }
    }
    let quotas = Quotas {
        default: None,
        per_source: tasks
            .iter()
            .map(|t| (t.name.to_string(), per_task.min(t.train.len())))
            .collect::<BTreeMap<_, _>>(),
    };
    let mixture =
        sample_mixture(&pool, &quotas, seed).map_err(|e| format!("probe mixture: {e}"))?;
    write_probe_set(path, &mixture).map_err(|e| format!("writing the probe set: {e}"))?;
    Ok(mixture.len())
}

/// Runs the native probe of `model` on `probe`, keeping every example's
/// rows; returns the statistics file.
pub fn probe(model: &Path, probe: &Path, threads: Option<usize>) -> Result<PathBuf, String> {
    let out = model.with_extension("stats.safetensors");
    let summary = probe_files(
        model,
        probe,
        &out,
        &ProbeOptions {
            max_examples: None,
            threads,
            ..ProbeOptions::default()
        },
    )
    .map_err(|e| format!("probing {}: {e}", model.display()))?;
    if summary.rows as usize != summary.examples {
        return Err(format!(
            "probe of {} kept {} rows of {} examples",
            model.display(),
            summary.rows,
            summary.examples
        ));
    }
    Ok(out)
}

/// Runs the native probe of `model` on `probe` for second moments
/// (`--gram`): over the examples of `sources` only when given (RegMean's
/// protocol: a model's own task), else over every example; means and
/// Grams, no rows. Returns the statistics file, `MODEL.TAG.stats.safetensors`.
pub fn probe_gram(
    model: &Path,
    probe: &Path,
    sources: Option<&[String]>,
    tag: &str,
    threads: Option<usize>,
) -> Result<PathBuf, String> {
    let out = model.with_extension(format!("{tag}.stats.safetensors"));
    probe_files(
        model,
        probe,
        &out,
        &ProbeOptions {
            max_examples: Some(0),
            threads,
            gram: true,
            sources: sources.map(<[String]>::to_vec),
            ..ProbeOptions::default()
        },
    )
    .map_err(|e| format!("probing {} for Grams: {e}", model.display()))?;
    Ok(out)
}

/// A RegMean config (SPEC §7) over `models` with their Gram statistics,
/// weight 1 each, with extra global `parameters` lines.
pub fn regmean_yaml(models: &[(&Path, &Path)], params: &[&str]) -> String {
    let mut y = "merge_method: regmean\nmodels:\n".to_string();
    for (m, s) in models {
        y += &format!("  - model: {}\n    stats: {}\n", q(m), q(s));
    }
    if !params.is_empty() {
        y += "parameters:\n";
        for p in params {
            y += &format!("  {p}\n");
        }
    }
    y
}

/// Runs merges into numbered directories under one folder.
pub struct Merger {
    /// Where outputs go.
    pub dir: PathBuf,
    /// Engine threads (`None`: all cores; results do not depend on it).
    pub threads: Option<usize>,
    /// The seed given to DARE's masks.
    pub seed: u64,
    count: usize,
}

/// A merged body and what the engine said.
pub struct Merged {
    /// The merged body, read back from `model.safetensors`.
    pub body: Vec<Dense>,
    /// The engine's summary (its report).
    pub summary: MergeSummary,
    /// FAM: the alignment of every group (empty for other methods).
    pub alignments: Vec<GroupAlignment>,
}

impl Merger {
    /// Merges into `dir/NNN-label`.
    pub fn new(dir: PathBuf, threads: Option<usize>, seed: u64) -> Merger {
        Merger {
            dir,
            threads,
            seed,
            count: 0,
        }
    }

    /// Parses `yaml`, runs the merge, reads the merged body back (shaped
    /// like `template`).
    pub fn run(&mut self, label: &str, yaml: &str, template: &[Dense]) -> Result<Merged, String> {
        self.count += 1;
        let slug: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let out = self.dir.join(format!("{:03}-{slug}", self.count));
        let why = |e: flatmerge::Error| format!("merge `{label}`: {e}\n--- config ---\n{yaml}");
        let mut config = MergeConfig::from_yaml(yaml, &self.dir, None).map_err(why)?;
        config.seed = self.seed;
        let merge = PreparedMerge::new(config).map_err(why)?;
        let alignments = if merge.config().fam().is_some() {
            merge.align().map_err(why)?
        } else {
            Vec::new()
        };
        let summary = merge
            .run(&MergeOptions {
                out_dir: out.clone(),
                threads: self.threads,
                force: true,
                ..MergeOptions::default()
            })
            .map_err(why)?;
        let body = read_body(&out, template)?;
        Ok(Merged {
            body,
            summary,
            alignments,
        })
    }
}

/// Reads `body.k.weight` / `body.k.bias` of a merged checkpoint into layers
/// shaped like `template`.
pub fn read_body(dir: &Path, template: &[Dense]) -> Result<Vec<Dense>, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    template
        .iter()
        .enumerate()
        .map(|(k, l)| {
            let get = |name: String, len: usize| -> Result<Vec<f32>, String> {
                let v = ckpt
                    .view(&name)
                    .ok_or_else(|| format!("{}: no tensor {name}", dir.display()))?
                    .to_f32_vec();
                if v.len() != len {
                    return Err(format!(
                        "{}: {name} has {} values, not {len}",
                        dir.display(),
                        v.len()
                    ));
                }
                Ok(v)
            };
            Ok(Dense {
                w: get(format!("body.{k}.weight"), l.w.len())?,
                b: get(format!("body.{k}.bias"), l.b.len())?,
                ..l.clone()
            })
        })
        .collect()
}

/// A baseline config: `method` over `models` (weight 1 each), optionally
/// with `base`, extra global `parameters` lines (`key: value`).
pub fn baseline_yaml(
    method: &str,
    base: Option<&Path>,
    models: &[&Path],
    params: &[&str],
) -> String {
    let mut y = format!("merge_method: {method}\n");
    if let Some(b) = base {
        y += &format!("base_model: {}\n", q(b));
    }
    y += "models:\n";
    for m in models {
        y += &format!("  - model: {}\n", q(m));
    }
    y += "parameters:\n  weight: 1.0\n";
    for p in params {
        y += &format!("  {p}\n");
    }
    y
}

/// A SAFE-M config at the SPEC defaults with the given score form:
/// receiver first, then the contributors; ancestor `base`.
pub fn safe_m_yaml(base: (&Path, &Path), models: &[(&Path, &Path)], score: &str) -> String {
    let mut y = format!(
        "merge_method: safe_m\nbase_model: {}\nbase_model_stats: {}\nmodels:\n",
        q(base.0),
        q(base.1)
    );
    for (m, s) in models {
        y += &format!("  - model: {}\n    stats: {}\n", q(m), q(s));
    }
    y += &format!("parameters:\n  score: {score}\n");
    y
}

/// How FAM's neuron groups are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamGroups {
    /// Both hidden layers, listed explicitly (the body's last layer feeds
    /// the task heads, which are not in the checkpoint).
    Explicit,
    /// The `sequential` template (it leaves the last layer's rows without a
    /// group).
    Sequential,
}

/// A FAM config for the pair `a` (receiver) and `b`, with `params` lines.
pub fn fam_yaml(
    a: (&Path, &Path),
    b: (&Path, &Path),
    layers: usize,
    groups: FamGroups,
    params: &[&str],
) -> String {
    let mut y = format!(
        "merge_method: fam\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
        q(a.0),
        q(a.1),
        q(b.0),
        q(b.1)
    );
    match groups {
        FamGroups::Sequential => y += "groups: sequential\n",
        FamGroups::Explicit => {
            y += "groups:\n";
            for k in 0..layers {
                y += &format!(
                    "  - name: body.{k}\n    producers: [body.{k}.weight, body.{k}.bias]\n    activations: body.{k}\n"
                );
                if k + 1 < layers {
                    y += &format!("    consumers: [body.{}.weight]\n", k + 1);
                }
            }
        }
    }
    if !params.is_empty() {
        y += "parameters:\n";
        for p in params {
            y += &format!("  {p}\n");
        }
    }
    y
}

/// `net` with hidden neuron `r` of layer `k` taken from neuron
/// `perms[k][r]`: rows of layer `k` and columns of layer `k + 1` (the head
/// included) permuted together, so the function is unchanged.
pub fn permute(net: &Net, perms: &[Vec<usize>]) -> Net {
    let mut out = net.clone();
    for (k, l) in out.layers.iter_mut().enumerate() {
        let src = &net.layers[k];
        let rows: Vec<usize> = perms
            .get(k)
            .cloned()
            .unwrap_or_else(|| (0..src.out).collect());
        let cols: Vec<usize> = k
            .checked_sub(1)
            .and_then(|p| perms.get(p).cloned())
            .unwrap_or_else(|| (0..src.inp).collect());
        for (r, &sr) in rows.iter().enumerate() {
            l.b[r] = src.b[sr];
            for (c, &sc) in cols.iter().enumerate() {
                l.w[r * l.inp + c] = src.w[sr * src.inp + sc];
            }
        }
    }
    out
}

/// A head that reads hidden neuron `i` of the receiver's basis from the
/// contributor's neuron `matching[i]` (a zero column where unmatched).
pub fn remap_head(head: &Dense, matching: &[Option<usize>]) -> Dense {
    let mut out = head.clone();
    for o in 0..head.out {
        for (i, m) in matching.iter().enumerate() {
            out.w[o * head.inp + i] = m.map_or(0.0, |j| head.w[o * head.inp + j]);
        }
    }
    out
}
