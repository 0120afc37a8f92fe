//! Neuron groups (SPEC §2.1): one neuron axis shared by several (tensor,
//! axis) pairs that must be permuted together — its producers' rows and
//! its consumers' columns — with the layer whose outputs are the neurons'
//! activations. Groups come from templates (LLaMA MLP, sequential MLP) or
//! from the config; they are named in the receiver's tensor names.

use serde::{Deserialize, Serialize};

/// One neuron group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeuronGroup {
    /// A name for reports (e.g. `model.layers.3.mlp`).
    pub name: String,
    /// Tensors whose rows (axis 0) are the neurons: weights and biases.
    pub producers: Vec<String>,
    /// Tensors whose columns (axis 1) are the neurons.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// The layer whose per-example outputs are the neurons' activations.
    pub activations: String,
}

/// LLaMA MLP groups (SPEC §2.1): for every `P.gate_proj.weight`,
/// `P.up_proj.weight`, `P.down_proj.weight` triple, one group `P` whose
/// producers are the rows of gate and up (and their biases, if any), whose
/// consumer is down's columns, and whose activations are up_proj's.
pub fn llama_mlp<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Vec<NeuronGroup> {
    let has = |n: &str| names.clone().any(|m| m == n);
    names
        .clone()
        .filter_map(|n| n.strip_suffix(".gate_proj.weight"))
        .filter(|p| has(&format!("{p}.up_proj.weight")) && has(&format!("{p}.down_proj.weight")))
        .map(|p| {
            let mut producers = vec![
                format!("{p}.gate_proj.weight"),
                format!("{p}.up_proj.weight"),
            ];
            for bias in [format!("{p}.gate_proj.bias"), format!("{p}.up_proj.bias")] {
                if has(&bias) {
                    producers.push(bias);
                }
            }
            NeuronGroup {
                name: p.to_string(),
                producers,
                consumers: vec![format!("{p}.down_proj.weight")],
                activations: format!("{p}.up_proj"),
            }
        })
        .collect()
}

/// Sequential MLP groups (SPEC §2.1): for consecutive linear layers
/// `L_i → L_{i+1}`, group `L_i` is the rows of `L_i.weight` (and
/// `L_i.bias`) with the columns of `L_{i+1}.weight`; the last layer's
/// outputs are the model's outputs and form no group.
pub fn sequential<'a>(
    layers: &[String],
    names: impl Iterator<Item = &'a str> + Clone,
) -> Vec<NeuronGroup> {
    let has = |n: &str| names.clone().any(|m| m == n);
    layers
        .windows(2)
        .map(|pair| {
            let mut producers = vec![format!("{}.weight", pair[0])];
            if has(&format!("{}.bias", pair[0])) {
                producers.push(format!("{}.bias", pair[0]));
            }
            NeuronGroup {
                name: pair[0].clone(),
                producers,
                consumers: vec![format!("{}.weight", pair[1])],
                activations: pair[0].clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_groups_take_gate_and_up_rows_with_down_columns() {
        let names = [
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ];
        let groups = llama_mlp(names.iter().copied());
        assert_eq!(groups.len(), 1, "layer 1 is incomplete");
        assert_eq!(groups[0].name, "model.layers.0.mlp");
        assert_eq!(groups[0].consumers, ["model.layers.0.mlp.down_proj.weight"]);
        assert_eq!(groups[0].activations, "model.layers.0.mlp.up_proj");
    }

    #[test]
    fn sequential_groups_chain_layers() {
        let layers = [
            "body.0".to_string(),
            "body.1".to_string(),
            "head".to_string(),
        ];
        let names = [
            "body.0.weight",
            "body.0.bias",
            "body.1.weight",
            "head.weight",
        ];
        let groups = sequential(&layers, names.iter().copied());
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].producers, ["body.0.weight", "body.0.bias"]);
        assert_eq!(groups[0].consumers, ["body.1.weight"]);
        assert_eq!(groups[1].producers, ["body.1.weight"]);
        assert_eq!(groups[1].consumers, ["head.weight"]);
    }
}
