//! Layer naming: which decoder layer a tensor belongs to, and which linear
//! layer a weight or bias is part of. One small module that the config
//! (gradients), the planner, the methods, the probes and the demo share, so
//! that none of them imports another for a name rule.

use crate::io::Checkpoint;
use crate::modules::Module;

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

/// A tensor name split around its decoder-layer index:
/// `model.layers.3.mlp.up_proj.weight` → (`model.`, 3, `mlp.up_proj.weight`).
/// The same occurrence of `layers.N.` as [`layer_index`] reads.
pub fn split_layer(name: &str) -> Option<(&str, usize, &str)> {
    split_stack(name, &["layers."]).map(|(prefix, _, index, rest)| (prefix, index, rest))
}

/// A tensor name split around the first of `words` (`layers.`,
/// `blocks.`) that is followed by a layer index and a dot:
/// `(prefix, word, index, rest)`. For one word, the occurrence
/// [`split_layer`] splits at.
pub fn split_stack<'a>(
    name: &'a str,
    words: &[&'static str],
) -> Option<(&'a str, &'static str, usize, &'a str)> {
    let (at, word) = words
        .iter()
        .filter_map(|w| name.find(w).map(|at| (at, *w)))
        .min_by_key(|(at, _)| *at)?;
    let after = &name[at + word.len()..];
    let digits = after.bytes().take_while(u8::is_ascii_digit).count();
    let index = after[..digits].parse().ok()?;
    let rest = after[digits..].strip_prefix('.')?;
    Some((&name[..at], word, index, rest))
}

/// The prefix of a checkpoint's decoder stack: of the `…layers.N.` stacks
/// it holds (a vision tower may have its own), the one with the most
/// tensors (ties: the first in name order), e.g. `model.` for LLaMA or
/// `model.language_model.` for llava-hf. `None` without layers.
pub fn decoder_prefix(checkpoint: &Checkpoint) -> Option<String> {
    decoder_stack(checkpoint).map(|(prefix, _)| prefix)
}

/// [`decoder_prefix`] with the stack's layer count.
fn decoder_stack(checkpoint: &Checkpoint) -> Option<(String, usize)> {
    largest_stack(checkpoint, |name| {
        split_layer(name).map(|(prefix, index, _)| (prefix, index))
    })
}

/// Of the layer stacks `split` finds in `checkpoint` (a tensor's prefix
/// before its layer index, and the index), the one with the most tensors
/// (ties: the first in name order), with its layer count: one more than
/// its largest index.
pub(crate) fn largest_stack<'a>(
    checkpoint: &'a Checkpoint,
    split: impl Fn(&'a str) -> Option<(&'a str, usize)>,
) -> Option<(String, usize)> {
    let mut stacks: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for t in checkpoint.tensors() {
        if let Some((prefix, index)) = split(&t.name) {
            let (tensors, layers) = stacks.entry(prefix).or_default();
            *tensors += 1;
            *layers = (*layers).max(index + 1);
        }
    }
    let mut best: Option<(&str, usize, usize)> = None;
    for (prefix, (tensors, layers)) in stacks {
        if best.is_none_or(|(_, most, _)| tensors > most) {
            best = Some((prefix, tensors, layers));
        }
    }
    best.map(|(prefix, _, layers)| (prefix.to_string(), layers))
}

/// The decoder layers `[first, first + count)` of one model, renumbered
/// from `out_first`: what one source of a `slices:` entry contributes
/// (mergekit's `layer_range`). Tensors outside the decoder stack go with
/// the first slice (`embeddings`: token embeddings, a vision tower, a
/// projector: the input side) or the last (`head`: the stack's final norm
/// and the output head), as mergekit's pre- and post-weights do.
///
/// Under `modules:` the window sees only its module's tensors, and the
/// stack is the module's ([`Module::split`]); a module merged from
/// `models:` is one `whole` window, all its layers under their own names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerWindow {
    /// First source layer.
    pub first: usize,
    /// Number of layers (of a `whole` window: the reference model's, once
    /// its checkpoint is open; 0 before).
    pub count: usize,
    /// Output index of the first layer.
    pub out_first: usize,
    /// Whether the tensors before the stack come with it.
    pub embeddings: bool,
    /// Whether the tensors after the stack come with it.
    pub head: bool,
    /// Where the window was written, for messages (`slices[1].sources[0].layer_range`).
    pub key: String,
    /// The slice's index among its config's (or its module's) slices.
    pub slice: usize,
    /// Under `modules:`, the module whose tensors it takes.
    pub module: Option<Module>,
    /// Every layer of the module, unrenumbered (a module's `models:`).
    pub whole: bool,
}

impl LayerWindow {
    /// A module's `models:`: every tensor of the module, as it is.
    pub fn whole_module(module: Module, key: String) -> LayerWindow {
        LayerWindow {
            first: 0,
            count: 0,
            out_first: 0,
            embeddings: true,
            head: true,
            key,
            slice: 0,
            module: Some(module),
            whole: true,
        }
    }

    /// The name split around its layer index, by the window's stack rule.
    fn split<'a>(&self, name: &'a str) -> Option<(&'a str, &'static str, usize, &'a str)> {
        match self.module {
            Some(module) => module.split(name),
            None => split_stack(name, &["layers."]),
        }
    }

    /// The window's layer stack in `checkpoint` (the decoder's, or its
    /// module's): its prefix and layer count; `None` without layers.
    pub fn stack(&self, checkpoint: &Checkpoint) -> Option<(String, usize)> {
        match self.module {
            Some(module) => module.stack(checkpoint),
            None => decoder_stack(checkpoint),
        }
    }

    /// The output name of the source tensor `name`, or `None` when the
    /// window leaves it out; `prefix` is the model's stack prefix
    /// ([`LayerWindow::stack`]).
    pub fn rename(&self, name: &str, prefix: Option<&str>) -> Option<String> {
        if let Some(module) = self.module {
            if Module::of(name) != module {
                return None;
            }
            if self.whole {
                return Some(name.into());
            }
        }
        match self.split(name) {
            Some((p, word, index, rest)) if Some(p) == prefix => {
                let offset = index.checked_sub(self.first).filter(|&o| o < self.count)?;
                Some(format!("{p}{word}{}.{rest}", self.out_first + offset))
            }
            _ if self.is_after_stack(name, prefix) => self.head.then(|| name.into()),
            _ => self.embeddings.then(|| name.into()),
        }
    }

    fn is_after_stack(&self, name: &str, prefix: Option<&str>) -> bool {
        match self.module {
            Some(module) => module.is_after_stack(name, prefix),
            None => is_head(name, prefix),
        }
    }

    /// The position of an output tensor for gradients within its slice:
    /// `offset / (count − 1)` for its layers (`1` for one layer, as
    /// [`layer_position`]), `0` for tensors outside the stack, as for a
    /// whole model: mergekit interpolates gradients per slice.
    pub fn position(&self, out_name: &str, prefix: Option<&str>) -> f64 {
        match self.split(out_name) {
            Some((p, _, index, _)) if Some(p) == prefix => {
                let offset = index.saturating_sub(self.out_first) as f64;
                if self.count <= 1 {
                    1.0
                } else {
                    offset / (self.count - 1) as f64
                }
            }
            _ => 0.0,
        }
    }
}

/// Whether a tensor outside the decoder stack sits after it: the stack's
/// final norm (`{prefix}norm.*`) or the output head (`lm_head.*`, `output.*`).
pub(crate) fn is_head(name: &str, prefix: Option<&str>) -> bool {
    let first = |s: &str, word: &str| s == word || s.starts_with(&format!("{word}."));
    let under_prefix = prefix.and_then(|p| name.strip_prefix(p));
    under_prefix.is_some_and(|rest| first(rest, "norm"))
        || first(name, "lm_head")
        || first(name, "output")
        || name.contains(".lm_head.")
        || name.ends_with(".lm_head")
}
