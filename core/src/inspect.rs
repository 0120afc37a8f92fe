//! What `flatmerge inspect` shows: summaries of checkpoints and statistics
//! files, and which weights of a checkpoint a statistics file covers.

use crate::dtype::Dtype;
use crate::io::Checkpoint;
use crate::stats::{ActivationStats, FORMAT};
use std::collections::BTreeMap;
use std::path::Path;

/// Whether `path` is an activation statistics file (by its metadata).
pub fn is_stats_file(path: &Path) -> bool {
    path.is_file()
        && Checkpoint::open(path)
            .map(|c| c.metadata().get("format").map(String::as_str) == Some(FORMAT))
            .unwrap_or(false)
}

/// Totals of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// Tensor count.
    pub tensors: usize,
    /// Element count.
    pub parameters: u64,
    /// Tensor data bytes.
    pub bytes: u64,
    /// Per dtype: (tensors, elements).
    pub by_dtype: BTreeMap<Dtype, (usize, u64)>,
    /// Shard files.
    pub shards: usize,
}

/// Totals of `checkpoint`.
pub fn summarize(checkpoint: &Checkpoint) -> CheckpointSummary {
    let mut by_dtype: BTreeMap<Dtype, (usize, u64)> = BTreeMap::new();
    for t in checkpoint.tensors() {
        let entry = by_dtype.entry(t.dtype).or_default();
        entry.0 += 1;
        entry.1 += t.numel() as u64;
    }
    CheckpointSummary {
        tensors: checkpoint.tensors().len(),
        parameters: by_dtype.values().map(|(_, n)| n).sum(),
        bytes: checkpoint.total_bytes(),
        by_dtype,
        shards: checkpoint.shard_paths().len(),
    }
}

/// How a statistics file covers one weight or bias of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// The layer has both means with the widths the weight needs.
    Covered,
    /// The layer has statistics, but they do not fit: why.
    Mismatch(String),
    /// No statistics for the layer (the tensor is merged by a fallback).
    Uncovered,
}

/// For every `*.weight` / `*.bias` of `checkpoint` that could be a linear
/// layer (2-D weight, 1-D bias), whether `stats` covers it; other tensors
/// are left out.
pub fn coverage(stats: &ActivationStats, checkpoint: &Checkpoint) -> Vec<(String, Coverage)> {
    let mut out = Vec::new();
    for t in checkpoint.tensors() {
        let Some((layer, is_weight)) = crate::plan::layer_of(&t.name) else {
            continue;
        };
        if t.shape.len() != if is_weight { 2 } else { 1 } {
            continue;
        }
        let coverage = match stats.layer(layer) {
            None => Coverage::Uncovered,
            Some(l) => {
                let mut problems = Vec::new();
                let mut need = |mean: &Option<Vec<f32>>, what: &str, width: usize| match mean {
                    Some(v) if v.len() == width => {}
                    Some(v) => {
                        problems.push(format!("{what} has width {}, needs {width}", v.len()))
                    }
                    None => problems.push(format!("{what} missing")),
                };
                need(&l.y_mean, "y_mean", t.shape[0]);
                if is_weight {
                    need(&l.x_mean, "x_mean", t.shape[1]);
                }
                if problems.is_empty() {
                    Coverage::Covered
                } else {
                    Coverage::Mismatch(problems.join("; "))
                }
            }
        };
        out.push((t.name.clone(), coverage));
    }
    out
}

/// Which layers of a statistics file have second moments (SPEC §4
/// version 2), and which examples the file covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GramSummary {
    /// Layers storing their own `x_gram`.
    pub stored: usize,
    /// Layers whose Gram is another layer's (`gram_shared`).
    pub shared: usize,
    /// Layers without a Gram.
    pub without: usize,
    /// The probe sources the recording was restricted to; `None`: the
    /// whole probe set.
    pub sources: Option<Vec<String>>,
}

/// The second moments of `stats`.
pub fn grams(stats: &ActivationStats) -> GramSummary {
    let mut summary = GramSummary {
        stored: 0,
        shared: 0,
        without: 0,
        sources: stats.sources.clone(),
    };
    for (name, layer) in &stats.layers {
        if layer.x_gram.is_some() {
            summary.stored += 1;
        } else if stats.gram(name).is_some() {
            summary.shared += 1;
        } else {
            summary.without += 1;
        }
    }
    summary
}

/// How one layer's Gram is held, for listings: its width, the layer it
/// shares it with, or `-`.
pub fn gram_of_layer(stats: &ActivationStats, layer: &str) -> String {
    match (
        stats.layer(layer).and_then(|l| l.gram_width()),
        stats.gram(layer),
    ) {
        (Some(width), _) => format!("{width}×{width}"),
        (None, Some(_)) => format!("= {}", stats.gram_owner(layer)),
        (None, None) => "-".to_string(),
    }
}
