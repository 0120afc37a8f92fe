//! mergekit's `modules:`: a multimodal checkpoint as a language model
//! (`text_decoder`), a vision tower (`vision_tower`) and the projector
//! between them (`multi_modal_projector`), each merged from its own
//! `models:` or `slices:`. mergekit learns which tensor belongs to which
//! module from an architecture file per model class; flatmerge reads it
//! from the tensor's name, so any checkpoint that uses the names below
//! works without a table of classes.
//!
//! A tensor belongs to the module named by the first component of its name
//! that is not a wrapper (`model.`, `language_model.`): see [`Module::of`].
//! A module's layer stack is its `…layers.N.` (or, in a vision tower,
//! `…blocks.N.`, as Qwen2-VL's `visual.blocks.N`) run with the most
//! tensors: see [`Module::split`].

use crate::io::Checkpoint;

/// One module of a multimodal checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// The language model: embeddings, decoder layers, final norm, head;
    /// every tensor the other modules do not claim.
    TextDecoder,
    /// The image encoder: `vision_tower.*` (LLaVA, Gemma-3, Mistral-3),
    /// `vision_model.*` (mPLUG-Owl2, Llama-4), `visual.*` (Qwen2-VL),
    /// `vision.*` (CogVLM).
    VisionTower,
    /// What carries image features into the language model:
    /// `multi_modal_projector.*` (llava-hf), `mm_projector.*` (LLaVA),
    /// `visual_abstractor.*` (mPLUG-Owl2), `visual.merger.*` (Qwen2-VL).
    MultiModalProjector,
}

/// Every module, in the order mergekit's architecture files list them.
pub const MODULES: [Module; 3] = [
    Module::TextDecoder,
    Module::MultiModalProjector,
    Module::VisionTower,
];

/// Name components that wrap a module rather than name one.
const WRAPPERS: [&str; 2] = ["model", "language_model"];

impl Module {
    /// The module's name in a config (mergekit's).
    pub fn as_str(self) -> &'static str {
        match self {
            Module::TextDecoder => "text_decoder",
            Module::VisionTower => "vision_tower",
            Module::MultiModalProjector => "multi_modal_projector",
        }
    }

    /// The module called `name` in a config.
    pub fn parse(name: &str) -> Option<Module> {
        MODULES.into_iter().find(|m| m.as_str() == name)
    }

    /// The module a tensor belongs to.
    pub fn of(name: &str) -> Module {
        let mut parts = name.split('.').skip_while(|p| WRAPPERS.contains(p));
        match (parts.next(), parts.next()) {
            (Some("multi_modal_projector" | "mm_projector" | "visual_abstractor"), _) => {
                Module::MultiModalProjector
            }
            (Some("visual"), Some("merger")) => Module::MultiModalProjector,
            (Some("vision_tower" | "vision_model" | "visual" | "vision"), _) => Module::VisionTower,
            _ => Module::TextDecoder,
        }
    }

    /// A tensor name of this module split around its layer index:
    /// `(prefix, stack word, index, rest)`. The language model's stack is
    /// `…layers.N.` (the rule of [`crate::layers::split_layer`]); a vision
    /// tower's may also be `…blocks.N.`.
    pub fn split(self, name: &str) -> Option<(&str, &'static str, usize, &str)> {
        let words: &[&'static str] = match self {
            Module::TextDecoder => &["layers."],
            Module::VisionTower | Module::MultiModalProjector => &["layers.", "blocks."],
        };
        crate::layers::split_stack(name, words)
    }

    /// The layer stack of this module in `checkpoint`, its prefix and layer
    /// count ([`crate::layers::largest_stack`] over the module's tensors).
    /// `None`: the module has no layers.
    pub fn stack(self, checkpoint: &Checkpoint) -> Option<(String, usize)> {
        crate::layers::largest_stack(checkpoint, |name| {
            if Module::of(name) != self {
                return None;
            }
            self.split(name)
                .map(|(prefix, _, index, _)| (prefix, index))
        })
    }

    /// Whether a tensor of this module outside its stack comes after it,
    /// so that a `slices:` merge takes it from the last slice, as
    /// mergekit's post-weights: the language model's final norm and head,
    /// a vision tower's final layer norm.
    pub fn is_after_stack(self, name: &str, prefix: Option<&str>) -> bool {
        match self {
            Module::TextDecoder => crate::layers::is_head(name, prefix),
            Module::VisionTower => ["post_layernorm", "post_layrnorm", "ln_post"]
                .iter()
                .any(|w| name.split('.').any(|p| p == *w)),
            Module::MultiModalProjector => false,
        }
    }

    /// Where `config.json` keeps this module's layer count, in the order
    /// looked for: `(object pointer, key)`. The projector has none.
    pub fn layer_count_keys(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Module::TextDecoder => &[
                ("", "num_hidden_layers"),
                ("/text_config", "num_hidden_layers"),
            ],
            Module::VisionTower => &[
                ("/vision_config", "num_hidden_layers"),
                ("/vision_config", "depth"),
            ],
            Module::MultiModalProjector => &[],
        }
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_fall_into_modules_by_their_names() {
        let cases = [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                Module::TextDecoder,
            ),
            (
                "model.language_model.embed_tokens.weight",
                Module::TextDecoder,
            ),
            ("lm_head.weight", Module::TextDecoder),
            (
                "model.layers.3.self_attn.q_proj.weight",
                Module::TextDecoder,
            ),
            (
                "multi_modal_projector.linear_1.weight",
                Module::MultiModalProjector,
            ),
            (
                "model.multi_modal_projector.linear_2.bias",
                Module::MultiModalProjector,
            ),
            ("model.mm_projector.0.weight", Module::MultiModalProjector),
            (
                "model.visual_abstractor.query_embeds",
                Module::MultiModalProjector,
            ),
            ("visual.merger.mlp.0.weight", Module::MultiModalProjector),
            ("visual.blocks.2.attn.qkv.weight", Module::VisionTower),
            ("model.visual.patch_embed.proj.weight", Module::VisionTower),
            (
                "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
                Module::VisionTower,
            ),
            (
                "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
                Module::VisionTower,
            ),
            (
                "model.vision_model.embeddings.cls_token",
                Module::VisionTower,
            ),
            // A name that merely contains a module's word is the language model's.
            (
                "model.layers.0.vision_expert_mlp.weight",
                Module::TextDecoder,
            ),
        ];
        for (name, module) in cases {
            assert_eq!(Module::of(name), module, "{name}");
        }
    }

    #[test]
    fn a_vision_tower_stack_may_be_blocks() {
        assert_eq!(
            Module::VisionTower.split("visual.blocks.12.mlp.fc1.weight"),
            Some(("visual.", "blocks.", 12, "mlp.fc1.weight"))
        );
        assert_eq!(
            Module::VisionTower.split("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"),
            Some((
                "vision_tower.vision_model.encoder.",
                "layers.",
                3,
                "mlp.fc1.weight"
            ))
        );
        // The language model keeps the `layers.` rule alone.
        assert_eq!(Module::TextDecoder.split("model.blocks.1.w"), None);
    }

    #[test]
    fn names_round_trip() {
        for m in MODULES {
            assert_eq!(Module::parse(m.as_str()), Some(m));
        }
        assert_eq!(Module::parse("audio_tower"), None);
    }
}
