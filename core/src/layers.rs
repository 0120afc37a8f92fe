//! Layer naming: which decoder layer a tensor belongs to, and which linear
//! layer a weight or bias is part of. One small module that the config
//! (gradients), the planner, the methods, the probes and the demo share, so
//! that none of them imports another for a name rule.

use crate::io::Checkpoint;

/// The decoder layer index of a tensor name (`model.layers.3.mlp…` → 3).
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// The layer position of a tensor for gradients: `layer / (layers − 1)` for
/// tensors of decoder layer `layer` (`1` when there is one layer), `0` for
/// the others.
pub fn layer_position(name: &str, layers: usize) -> f64 {
    match layer_index(name) {
        Some(_) if layers <= 1 => 1.0,
        Some(layer) => layer as f64 / (layers - 1) as f64,
        None => 0.0,
    }
}

/// Decoder layers of a checkpoint: one more than the largest `layers.N` index.
pub fn layer_count(checkpoint: &Checkpoint) -> usize {
    checkpoint
        .tensors()
        .iter()
        .filter_map(|t| layer_index(&t.name))
        .max()
        .map_or(0, |l| l + 1)
}

/// The name of the linear layer a tensor belongs to and whether it is its
/// weight (`false`: its bias), or `None` for other names.
pub fn layer_of(name: &str) -> Option<(&str, bool)> {
    if let Some(layer) = name.strip_suffix(".weight") {
        Some((layer, true))
    } else {
        name.strip_suffix(".bias").map(|layer| (layer, false))
    }
}
