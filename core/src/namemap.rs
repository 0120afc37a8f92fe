//! Name maps (SPEC §5): ordered rules `regex → replacement(s)` that turn a
//! contributor's tensor names into the receiver's. The first rule whose
//! pattern matches the whole name wins; a name no rule matches is used
//! unchanged; a rule may give several replacements (one tensor of B feeds
//! several of A) or none (the tensor is dropped). A `concat` rule builds a
//! tensor of B from the rows of several (LLaVA's q, k and v stacked as
//! CogVLM's fused `query_key_value`) and feeds it to A's tensors.

use crate::error::{Error, ErrorKind, Result};
use regex::Regex;
use serde::Deserialize;
use std::path::Path;

/// One rule as written in a config or a map file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// A regular expression matched against the whole name.
    pub pattern: String,
    /// The replacement(s): a string, a list of strings, or `null`/`[]` to
    /// drop the tensor. `$1`, `${name}` refer to capture groups.
    #[serde(default)]
    pub replace: Replacement,
    /// With parts, a `concat` rule: for each tensor of B the pattern
    /// matches, the rows of these tensors of B (names with the pattern's
    /// captures filled in), stacked in order, feed the replacement(s).
    /// Every `concat` rule that matches applies (one part may feed several
    /// stacks); the parts are not looked up by the other rules.
    #[serde(default)]
    pub concat: Vec<String>,
}

/// The replacement part of a rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(untagged)]
pub enum Replacement {
    /// Drop the tensor.
    #[default]
    Drop,
    /// One name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pattern: Regex,
    replacements: Vec<String>,
    /// A `concat` rule's parts (templates); empty for a name rule.
    parts: Vec<String>,
}

/// A tensor of B stacked from the rows of several of B's (a `concat`
/// rule), and the tensors of A it feeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concatenation {
    /// Its name: the parts' names with their common prefix and suffix
    /// written once, `model.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight`
    /// (braces and commas appear in no stored tensor's name).
    pub name: String,
    /// B's tensors whose rows it stacks, in order.
    pub parts: Vec<String>,
    /// A's tensors it feeds.
    pub targets: Vec<String>,
}

/// A compiled name map.
#[derive(Debug, Clone, Default)]
pub struct NameMap {
    /// Where the map came from (a built-in name, a file, or `config`).
    pub source: String,
    rules: Vec<Rule>,
    /// The `concat` rules, in order.
    concats: Vec<Rule>,
    /// Receiver tensors the map expects to have no counterpart (kept from
    /// A, accounted for): mPLUG-Owl2's vision modules.
    receiver_only: Vec<Regex>,
    /// Contributor tensors whose target the receiver may lack (dropped
    /// then, accounted for): a vision tower some copies of A do not store.
    optional: Vec<Regex>,
}

/// The built-in maps, by name (`name_map: auto` chooses among these and
/// `identity`).
pub const BUILTIN: [&str; 9] = [
    "llava-1.5-to-mplug-owl2",
    "llava-hf-to-mplug-owl2",
    "llava-hf-to-llava",
    "llava-onevision-to-qwen2-vl",
    "sharegpt4v-to-llava",
    "llava-to-sharegpt4v",
    "llava-1.5-to-cogvlm",
    "llava-hf-to-cogvlm",
    "mplug-owl2-to-cogvlm",
];

/// The value of `name_map` that picks a built-in map from the checkpoints.
pub const AUTO: &str = "auto";

/// How one map accounts for every tensor of a pair (SPEC §5): each tensor
/// of B is mapped (to one or several tensors of A) or dropped by a rule,
/// each tensor of A receives from B or is one the map keeps from A. What
/// is left is unaccounted for (`--strict` refuses exactly those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    /// B's tensors mapped to exactly one tensor of A: `(b, a)`.
    pub mapped: Vec<(String, String)>,
    /// B's tensors feeding several tensors of A: `(b, [a…])`.
    pub one_to_many: Vec<(String, Vec<String>)>,
    /// Tensors stacked from B's rows, each feeding one or several tensors
    /// of A; their parts are accounted for by them (a part may be in
    /// several).
    pub concatenated: Vec<Concatenation>,
    /// A's tensors the map keeps from A (no counterpart expected).
    pub kept_from_a: Vec<String>,
    /// B's tensors a rule drops (or whose optional target A lacks).
    pub dropped_from_b: Vec<String>,
    /// A's tensors with no counterpart the map expected.
    pub unaccounted_a: Vec<String>,
    /// B's tensors mapped to names A lacks, or matched by no rule and
    /// absent from A.
    pub unaccounted_b: Vec<String>,
    /// B's tensors some rule matched (0: the map acted as the identity).
    pub by_rule: usize,
}

impl Accounting {
    /// Tensors unaccounted for, on both sides.
    pub fn unaccounted(&self) -> usize {
        self.unaccounted_a.len() + self.unaccounted_b.len()
    }

    /// B's tensors whose rows feed a stacked tensor, each once, in order.
    pub fn stacked_parts(&self) -> Vec<&str> {
        let mut seen = std::collections::BTreeSet::new();
        self.concatenated
            .iter()
            .flat_map(|c| c.parts.iter().map(String::as_str))
            .filter(|p| seen.insert(*p))
            .collect()
    }

    /// The first `n` unaccounted tensors, `A: name` / `B: name`.
    pub fn first_unaccounted(&self, n: usize) -> Vec<String> {
        self.unaccounted_b
            .iter()
            .map(|t| format!("B `{t}`"))
            .chain(self.unaccounted_a.iter().map(|t| format!("A `{t}`")))
            .take(n)
            .collect()
    }
}

impl NameMap {
    /// The identity map.
    pub fn identity() -> NameMap {
        NameMap {
            source: "identity".into(),
            ..NameMap::default()
        }
    }

    /// The `auto` placeholder: [`NameMap::detect`] replaces it once the
    /// checkpoints are open.
    pub fn auto() -> NameMap {
        NameMap {
            source: AUTO.into(),
            ..NameMap::default()
        }
    }

    /// Whether this is the `auto` placeholder.
    pub fn is_auto(&self) -> bool {
        self.source == AUTO && self.rules.is_empty()
    }

    /// Compiles rules; an invalid pattern is an error naming it.
    pub fn new(source: &str, rules: &[RawRule]) -> Result<NameMap> {
        let compiled: Vec<Rule> = rules
            .iter()
            .map(|r| {
                let anchored = format!("^(?:{})$", r.pattern);
                let pattern = Regex::new(&anchored).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!("invalid pattern in name map {source}: {e}"),
                    )
                    .with_tensor(&r.pattern)
                })?;
                let replacements = match &r.replace {
                    Replacement::Drop => Vec::new(),
                    Replacement::One(s) => vec![s.clone()],
                    Replacement::Many(v) => v.clone(),
                };
                if !r.concat.is_empty() && replacements.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("a `concat` rule in name map {source} needs `replace`: the tensors of A it feeds"),
                    )
                    .with_tensor(&r.pattern));
                }
                Ok(Rule {
                    pattern,
                    replacements,
                    parts: r.concat.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let (concats, rules) = compiled.into_iter().partition(|r| !r.parts.is_empty());
        Ok(NameMap {
            source: source.to_string(),
            rules,
            concats,
            ..NameMap::default()
        })
    }

    /// The tensors B's `concat` rules stack, in B's order, whether or not
    /// their parts exist: for each name of `b` each matching rule gives one
    /// (a stack named twice is listed once).
    pub fn concatenations<'a>(&self, b: impl IntoIterator<Item = &'a str>) -> Vec<Concatenation> {
        let mut out: Vec<Concatenation> = Vec::new();
        for name in b {
            for rule in &self.concats {
                let Some(captures) = rule.pattern.captures(name) else {
                    continue;
                };
                let expand = |templates: &[String]| -> Vec<String> {
                    templates
                        .iter()
                        .map(|t| {
                            let mut s = String::new();
                            captures.expand(t, &mut s);
                            s
                        })
                        .collect()
                };
                let parts = expand(&rule.parts);
                let c = Concatenation {
                    name: stacked_name(&parts),
                    parts,
                    targets: expand(&rule.replacements),
                };
                if !out
                    .iter()
                    .any(|o| o.name == c.name && o.targets == c.targets)
                {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The same map with patterns (whole-name, as rules) for receiver
    /// tensors kept from A and contributor tensors whose target A may lack.
    fn with_accounting(mut self, receiver_only: &[&str], optional: &[&str]) -> NameMap {
        let compile = |p: &&str| Regex::new(&format!("^(?:{p})$")).ok();
        self.receiver_only = receiver_only.iter().filter_map(compile).collect();
        self.optional = optional.iter().filter_map(compile).collect();
        self
    }

    /// A built-in map by name (see [`BUILTIN`] and the README's tensor
    /// accounting of each).
    pub fn builtin(name: &str) -> Option<NameMap> {
        // mPLUG-Owl2's modules without a LLaVA counterpart
        // (heterogeneous-pairs.md): its ViT and visual abstractor.
        const MPLUG_ONLY: [&str; 2] = [r"model\.vision_model\..*", r"model\.visual_abstractor\..*"];
        // One LLaVA tensor feeds both modality copies of k/v and the two
        // norms (the published AdaMMS merge does the same).
        let multiway = |prefix: &str| {
            vec![
                rule(
                    &format!(r"{prefix}layers\.(\d+)\.self_attn\.(k_proj|v_proj)\.weight"),
                    &[
                        "model.layers.$1.self_attn.$2.multiway.0.weight",
                        "model.layers.$1.self_attn.$2.multiway.1.weight",
                    ],
                ),
                rule(
                    &format!(
                        r"{prefix}layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight"
                    ),
                    &[
                        "model.layers.$1.$2.multiway.0.weight",
                        "model.layers.$1.$2.multiway.1.weight",
                    ],
                ),
            ]
        };
        // llava-hf's language model in either naming in circulation: as
        // transformers saves it (`language_model.model.*`,
        // `language_model.lm_head`) and as newer transformers names it in
        // memory (`model.language_model.*`, top-level `lm_head`).
        let llava_hf_language = || {
            vec![
                rule(
                    r"(?:language_model\.model|model\.language_model)\.(.*)",
                    &["model.$1"],
                ),
                rule(r"language_model\.lm_head\.(.*)", &["lm_head.$1"]),
            ]
        };
        // The tower's own top-level modules (CLIP, SigLIP), so that the
        // original layout's `model.vision_tower.vision_tower.*` is not taken
        // for llava-hf's.
        let llava_hf_vision = r"(?:model\.)?vision_tower\.(?:vision_model\.)?((?:embeddings|encoder|pre_layrnorm|post_layernorm|head)\..*)";
        let llava_hf_projector = r"(?:model\.)?multi_modal_projector\.linear_([12])\.(weight|bias)";
        // A llava-hf contributor into a receiver without its projector and
        // vision tower: the language model renamed, the rest dropped.
        let llava_hf_language_only = || {
            let mut rules = llava_hf_language();
            rules.push(rule(llava_hf_projector, &[]));
            rules.push(rule(llava_hf_vision, &[]));
            rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
            rules
        };
        // CogVLM (THUDM/cogvlm-chat-hf): each decoder layer has a language
        // and a vision expert for attention (`*_expert_query_key_value`,
        // q, k, v rows fused in that order, no bias; `*_expert_dense`, the
        // o_proj) and for the MLP (`mlp.language_mlp.*`, `mlp.vision_mlp.*`),
        // with one pair of norms; `model.vision.*` (EVA2-CLIP and its GLU
        // adapter) has no counterpart, nor do the rotary buffers it stores.
        const COGVLM_ONLY: [&str; 2] = [
            r"model\.vision\..*",
            r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
        ];
        // B's single o_proj and MLP (decoder stack under `prefix`) feed
        // both experts.
        let cogvlm_experts = |prefix: &str| {
            vec![
                rule(
                    &format!(r"{prefix}layers\.(\d+)\.self_attn\.o_proj\.weight"),
                    &[
                        "model.layers.$1.self_attn.language_expert_dense.weight",
                        "model.layers.$1.self_attn.vision_expert_dense.weight",
                    ],
                ),
                rule(
                    &format!(r"{prefix}layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight"),
                    &[
                        "model.layers.$1.mlp.language_mlp.$2.weight",
                        "model.layers.$1.mlp.vision_mlp.$2.weight",
                    ],
                ),
            ]
        };
        // LLaVA's q, k and v stacked (CogVLM's order) feed both experts'
        // fused qkv; the prefix is captured so either llava-hf naming
        // finds its own parts.
        let llava_to_cogvlm = |prefix: &str| {
            let mut rules = vec![concat(
                &format!(r"({prefix})layers\.(\d+)\.self_attn\.q_proj\.weight"),
                &[
                    "${1}layers.$2.self_attn.q_proj.weight",
                    "${1}layers.$2.self_attn.k_proj.weight",
                    "${1}layers.$2.self_attn.v_proj.weight",
                ],
                &[
                    "model.layers.$2.self_attn.language_expert_query_key_value.weight",
                    "model.layers.$2.self_attn.vision_expert_query_key_value.weight",
                ],
            )];
            rules.extend(cogvlm_experts(prefix));
            rules
        };
        let map = match name {
            // Original LLaVA-1.5 layout → CogVLM: q/k/v stacked into both
            // fused qkv, o_proj and the MLP into both experts; the norms,
            // embedding and `lm_head` by their own names.
            "llava-1.5-to-cogvlm" => {
                let mut rules = llava_to_cogvlm(r"model\.");
                rules.push(rule(r"model\.mm_projector\..*", &[]));
                rules.push(rule(r"model\.vision_tower\..*", &[]));
                rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&COGVLM_ONLY, &[])
            }
            // llava-hf (either naming) → CogVLM: as above.
            "llava-hf-to-cogvlm" => {
                let mut rules =
                    llava_to_cogvlm(r"(?:language_model\.model|model\.language_model)\.");
                rules.extend(llava_hf_language_only());
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&COGVLM_ONLY, &[])
            }
            // mPLUG-Owl2 → CogVLM: the shared q_proj with the text copies
            // of k/v (`multiway.0`) feed the language expert's qkv, with the
            // image copies (`multiway.1`) the vision expert's. CogVLM's one
            // pair of norms belongs to its language model, so it takes the
            // text copies; the image copies are dropped, as are Owl2's
            // vision modules.
            "mplug-owl2-to-cogvlm" => {
                let stack = |copy: &str, expert: &str| {
                    concat(
                        r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight",
                        &[
                            "model.layers.$1.self_attn.q_proj.weight",
                            &format!("model.layers.$1.self_attn.k_proj.multiway.{copy}.weight"),
                            &format!("model.layers.$1.self_attn.v_proj.multiway.{copy}.weight"),
                        ],
                        &[&format!(
                            "model.layers.$1.self_attn.{expert}_expert_query_key_value.weight"
                        )],
                    )
                };
                let mut rules = vec![stack("0", "language"), stack("1", "vision")];
                rules.extend(cogvlm_experts(r"model\."));
                rules.push(rule(
                    r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.multiway\.0\.weight",
                    &["model.layers.$1.$2.weight"],
                ));
                rules.push(rule(
                    r"model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm)\.multiway\.1\.weight",
                    &[],
                ));
                rules.push(rule(r"model\.vision_model\..*", &[]));
                rules.push(rule(r"model\.visual_abstractor\..*", &[]));
                rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&COGVLM_ONLY, &[])
            }
            // Original LLaVA-1.5 layout → mPLUG-Owl2: LLaVA's projector and
            // vision tower have no place in mPLUG-Owl2.
            "llava-1.5-to-mplug-owl2" => {
                let mut rules = multiway(r"model\.");
                rules.push(rule(r"model\.mm_projector\..*", &[]));
                rules.push(rule(r"model\.vision_tower\..*", &[]));
                rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&MPLUG_ONLY, &[])
            }
            // llava-hf → mPLUG-Owl2: as above, from either llava-hf naming.
            "llava-hf-to-mplug-owl2" => {
                let mut rules = multiway(r"(?:language_model\.model|model\.language_model)\.");
                rules.extend(llava_hf_language_only());
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&MPLUG_ONLY, &[])
            }
            // llava-hf → the original LLaVA layout: the projector's two
            // linear layers are `mm_projector.0` and `.2` (a GELU between),
            // the CLIP tower sits under `model.vision_tower.vision_tower`;
            // released LLaVA checkpoints do not store the tower, so its
            // tensors are dropped when A lacks them.
            "llava-hf-to-llava" => {
                // `linear_1` is `.0`, `linear_2` is `.2` (a GELU at `.1`).
                let mut rules = llava_hf_language();
                rules.push(rule(
                    r"(?:model\.)?multi_modal_projector\.linear_1\.(weight|bias)",
                    &["model.mm_projector.0.$1"],
                ));
                rules.push(rule(
                    r"(?:model\.)?multi_modal_projector\.linear_2\.(weight|bias)",
                    &["model.mm_projector.2.$1"],
                ));
                rules.push(rule(
                    llava_hf_vision,
                    &["model.vision_tower.vision_tower.vision_model.$1"],
                ));
                rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&[], &[llava_hf_vision])
            }
            // LLaVA-OneVision-Qwen2 (llava-hf, either naming) → Qwen2-VL as
            // transformers saves it (`model.layers.*`, `lm_head`, `visual.*`):
            // the same Qwen2 language model; OneVision's SigLIP tower,
            // projector and `image_newline` have no place in Qwen2-VL, whose
            // own vision tower and merger are kept. The vocabularies differ
            // (151646 vs 152064 rows): see the FAM plan.
            "llava-onevision-to-qwen2-vl" => {
                let mut rules = llava_hf_language();
                rules.push(rule(r"(?:model\.)?multi_modal_projector\..*", &[]));
                rules.push(rule(llava_hf_vision, &[]));
                rules.push(rule(r"(?:model\.)?image_newline", &[]));
                rules.push(rule(r".*\.rotary_emb\.inv_freq", &[]));
                NameMap::new(name, &rules)
                    .ok()?
                    .with_accounting(&[r"(?:model\.)?visual\..*"], &[])
            }
            // ShareGPT4V is built on the LLaVA code base: the same names, but
            // it stores its fine-tuned CLIP tower
            // (`model.vision_tower.vision_tower.*`), which released LLaVA-1.5
            // checkpoints do not. Into LLaVA the tower is dropped when A lacks
            // it; into ShareGPT4V, A's tower is kept when B lacks it.
            "sharegpt4v-to-llava" => NameMap::new(name, &[rule(r".*\.rotary_emb\.inv_freq", &[])])
                .ok()?
                .with_accounting(&[], &[r"model\.vision_tower\..*"]),
            "llava-to-sharegpt4v" => NameMap::new(name, &[rule(r".*\.rotary_emb\.inv_freq", &[])])
                .ok()?
                .with_accounting(&[r"model\.vision_tower\..*"], &[]),
            _ => return None,
        };
        Some(map)
    }

    /// How this map accounts for the tensors of receiver `a` and
    /// contributor `b` ([`Accounting`]), in the checkpoints' orders.
    pub fn account<'a>(
        &self,
        a: impl IntoIterator<Item = &'a str>,
        b: impl IntoIterator<Item = &'a str>,
    ) -> Accounting {
        let a: Vec<&str> = a.into_iter().collect();
        let b: Vec<&str> = b.into_iter().collect();
        let in_a: std::collections::BTreeSet<&str> = a.iter().copied().collect();
        let in_b: std::collections::BTreeSet<&str> = b.iter().copied().collect();
        let mut fed = std::collections::BTreeSet::new();
        let mut out = Accounting::default();
        // A stack accounts for its parts when all of them are in B and all
        // of its targets in A, as a name rule's one-to-many does; otherwise
        // its parts meet the name rules (and are, in practice, unaccounted).
        let mut parts = std::collections::BTreeSet::new();
        for c in self.concatenations(b.iter().copied()) {
            if c.parts.iter().all(|p| in_b.contains(p.as_str()))
                && c.targets.iter().all(|t| in_a.contains(t.as_str()))
            {
                parts.extend(c.parts.iter().cloned());
                fed.extend(c.targets.iter().cloned());
                out.concatenated.push(c);
            }
        }
        for name in b {
            if parts.contains(name) {
                continue;
            }
            let (matched, targets) = self.apply_rule(name);
            out.by_rule += usize::from(matched);
            let present: Vec<String> = targets
                .iter()
                .filter(|t| in_a.contains(t.as_str()))
                .cloned()
                .collect();
            if matched && targets.is_empty() {
                out.dropped_from_b.push(name.to_string());
            } else if present.len() == targets.len() && !targets.is_empty() {
                fed.extend(present.iter().cloned());
                if present.len() == 1 {
                    out.mapped.push((name.to_string(), present[0].clone()));
                } else {
                    out.one_to_many.push((name.to_string(), present));
                }
            } else if self.optional.iter().any(|r| r.is_match(name)) {
                out.dropped_from_b.push(name.to_string());
            } else {
                out.unaccounted_b.push(name.to_string());
            }
        }
        for name in a {
            if fed.contains(name) {
                continue;
            }
            if self.receiver_only.iter().any(|r| r.is_match(name)) {
                out.kept_from_a.push(name.to_string());
            } else {
                out.unaccounted_a.push(name.to_string());
            }
        }
        out
    }

    /// Picks the map for a pair (`name_map: auto`): among `identity` and
    /// every built-in map, the one that accounts for every tensor of both
    /// checkpoints. Errors ([`ErrorKind::Config`], naming both files): none
    /// does — the message names the map that came nearest and its first
    /// unaccounted tensors — or several do.
    pub fn detect<'a>(
        a: impl IntoIterator<Item = &'a str>,
        b: impl IntoIterator<Item = &'a str>,
        a_file: &Path,
        b_file: &Path,
    ) -> Result<(NameMap, Accounting)> {
        let a: Vec<&str> = a.into_iter().collect();
        let b: Vec<&str> = b.into_iter().collect();
        let mut candidates: Vec<(NameMap, Accounting)> = std::iter::once(NameMap::identity())
            .chain(BUILTIN.iter().filter_map(|n| NameMap::builtin(n)))
            .map(|m| {
                let acc = m.account(a.iter().copied(), b.iter().copied());
                (m, acc)
            })
            .collect();
        let files = format!("A {} and B {}", a_file.display(), b_file.display());
        // A built-in map that renames, drops and keeps nothing on this pair
        // is the identity in disguise (two checkpoints of the same layout):
        // only `identity` itself counts then, so such pairs are not ambiguous.
        let fits = |(m, acc): &(NameMap, Accounting)| {
            let acted = acc.by_rule > 0
                || !acc.kept_from_a.is_empty()
                || !acc.dropped_from_b.is_empty()
                || !acc.concatenated.is_empty();
            acc.unaccounted() == 0 && (m.source == "identity" || acted)
        };
        let complete: Vec<&str> = candidates
            .iter()
            .filter(|c| fits(c))
            .map(|(m, _)| m.source.as_str())
            .collect();
        match complete.len() {
            1 => {
                let i = candidates.iter().position(fits).unwrap_or(0);
                Ok(candidates.swap_remove(i))
            }
            0 => {
                // The commonest slip: the receiver listed second. A built-in
                // map that fits the pair the other way round says so.
                let swapped = BUILTIN
                    .iter()
                    .filter_map(|n| NameMap::builtin(n))
                    .find(|m| {
                        let acc = m.account(b.iter().copied(), a.iter().copied());
                        fits(&(m.clone(), acc))
                    });
                if let Some(m) = swapped {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "name_map: auto: no built-in map accounts for every tensor of {files}, but `{}` does with the two the other way round: list {} first (the receiver A) and {} second",
                            m.source,
                            b_file.display(),
                            a_file.display()
                        ),
                    ));
                }
                // Nearest: fewest unaccounted; the first on a tie (built-in order).
                let (m, acc) = candidates
                    .iter()
                    .min_by_key(|(_, acc)| acc.unaccounted())
                    .ok_or_else(|| Error::new(ErrorKind::Config, "no name maps"))?;
                Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "name_map: auto: no built-in map accounts for every tensor of {files}; \
                         nearest `{}` leaves {} unaccounted, first {} (write a map file, or \
                         name a map and accept the rest as kept/dropped)",
                        m.source,
                        acc.unaccounted(),
                        acc.first_unaccounted(3).join(", ")
                    ),
                ))
            }
            _ => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "name_map: auto: the maps {} all account for every tensor of {files}; name \
                     one",
                    complete
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// A map file (YAML or JSON): a list of `{pattern, replace}` rules.
    pub fn from_file(path: &Path) -> Result<NameMap> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let rules: Vec<RawRule> = serde_saphyr::from_str(&text).map_err(|e| {
            let text = e.to_string();
            Error::new(
                ErrorKind::Config,
                text.lines()
                    .next()
                    .unwrap_or("invalid name map")
                    .to_string(),
            )
            .with_file(path)
        })?;
        NameMap::new(&path.display().to_string(), &rules)
    }

    /// The receiver names `name` maps to: itself when no rule matches,
    /// several names, or none (dropped).
    pub fn apply(&self, name: &str) -> Vec<String> {
        self.apply_rule(name).1
    }

    /// [`apply`](Self::apply), and whether a rule matched (a drop by a
    /// rule is accounted for; an unmatched name is used unchanged).
    fn apply_rule(&self, name: &str) -> (bool, Vec<String>) {
        for rule in &self.rules {
            if let Some(captures) = rule.pattern.captures(name) {
                let names = rule
                    .replacements
                    .iter()
                    .map(|r| {
                        let mut out = String::new();
                        captures.expand(r, &mut out);
                        out
                    })
                    .collect();
                return (true, names);
            }
        }
        (false, vec![name.to_string()])
    }

    /// Whether B's tensor `name` is dropped on purpose: by a rule with no
    /// replacement, or as an optional tensor whose target A lacks.
    pub fn drops(&self, name: &str, receiver_has: impl Fn(&str) -> bool) -> bool {
        let (matched, targets) = self.apply_rule(name);
        (matched && targets.is_empty())
            || (self.optional.iter().any(|r| r.is_match(name))
                && !targets.iter().all(|t| receiver_has(t)))
    }

    /// Whether A's tensor `name` is one the map keeps from A.
    pub fn keeps(&self, name: &str) -> bool {
        self.receiver_only.iter().any(|r| r.is_match(name))
    }
}

fn rule(pattern: &str, replacements: &[&str]) -> RawRule {
    RawRule {
        pattern: pattern.to_string(),
        replace: Replacement::Many(replacements.iter().map(|s| s.to_string()).collect()),
        concat: Vec::new(),
    }
}

/// A `concat` rule: for each name `pattern` matches, `parts` stacked feed
/// `replacements`.
fn concat(pattern: &str, parts: &[&str], replacements: &[&str]) -> RawRule {
    RawRule {
        concat: parts.iter().map(|s| s.to_string()).collect(),
        ..rule(pattern, replacements)
    }
}

/// The name of a stacked tensor: its parts with their common prefix and
/// suffix written once (`p.{a,b}.weight`), cut at `.` so a name's segments
/// stay whole.
fn stacked_name(parts: &[String]) -> String {
    let Some(first) = parts.first() else {
        return "{}".into();
    };
    if parts.len() == 1 {
        return format!("{{{first}}}");
    }
    let shortest = parts.iter().map(String::len).min().unwrap_or(0);
    let same_at = |i: usize, from_end: bool| {
        let byte = |p: &String| {
            let b = p.as_bytes();
            if from_end {
                b[b.len() - 1 - i]
            } else {
                b[i]
            }
        };
        parts.iter().all(|p| byte(p) == byte(first))
    };
    // The longest common prefix ending at a `.`, then the longest common
    // suffix starting at one, within what the prefix left.
    let mut prefix = 0;
    for i in 0..shortest {
        if !same_at(i, false) {
            break;
        }
        if first.as_bytes()[i] == b'.' {
            prefix = i + 1;
        }
    }
    let mut suffix = 0;
    for i in 0..shortest - prefix {
        if !same_at(i, true) {
            break;
        }
        if first.as_bytes()[first.len() - 1 - i] == b'.' {
            suffix = i + 1;
        }
    }
    let middles: Vec<&str> = parts.iter().map(|p| &p[prefix..p.len() - suffix]).collect();
    format!(
        "{}{{{}}}{}",
        &first[..prefix],
        middles.join(","),
        &first[first.len() - suffix..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_maps_into_mplug_owl2() {
        let map = NameMap::builtin("llava-1.5-to-mplug-owl2").unwrap();
        assert_eq!(
            map.apply("model.layers.7.self_attn.k_proj.weight"),
            [
                "model.layers.7.self_attn.k_proj.multiway.0.weight",
                "model.layers.7.self_attn.k_proj.multiway.1.weight"
            ]
        );
        assert_eq!(
            map.apply("model.layers.0.post_attention_layernorm.weight")
                .len(),
            2
        );
        assert_eq!(
            map.apply("model.layers.0.self_attn.q_proj.weight"),
            ["model.layers.0.self_attn.q_proj.weight"]
        );
        assert!(map.apply("model.mm_projector.0.weight").is_empty());
        assert!(map
            .apply("model.layers.0.self_attn.rotary_emb.inv_freq")
            .is_empty());
    }

    #[test]
    fn llava_hf_maps_take_either_naming() {
        let owl = NameMap::builtin("llava-hf-to-mplug-owl2").unwrap();
        for prefix in ["language_model.model.", "model.language_model."] {
            assert_eq!(
                owl.apply(&format!("{prefix}layers.3.self_attn.v_proj.weight")),
                [
                    "model.layers.3.self_attn.v_proj.multiway.0.weight",
                    "model.layers.3.self_attn.v_proj.multiway.1.weight"
                ]
            );
            assert_eq!(
                owl.apply(&format!("{prefix}layers.3.mlp.up_proj.weight")),
                ["model.layers.3.mlp.up_proj.weight"]
            );
        }
        assert_eq!(
            owl.apply("language_model.lm_head.weight"),
            ["lm_head.weight"]
        );
        assert!(owl.apply("multi_modal_projector.linear_2.bias").is_empty());
        assert!(owl
            .apply("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
            .is_empty());
        assert!(owl.keeps("model.visual_abstractor.vit_eos"));
        let llava = NameMap::builtin("llava-hf-to-llava").unwrap();
        assert_eq!(
            llava.apply("model.multi_modal_projector.linear_2.weight"),
            ["model.mm_projector.2.weight"]
        );
        assert_eq!(
            llava.apply("multi_modal_projector.linear_1.bias"),
            ["model.mm_projector.0.bias"]
        );
        assert_eq!(
            llava.apply("vision_tower.vision_model.post_layernorm.weight"),
            ["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"]
        );
        // Released LLaVA has no tower: dropped on purpose then, mapped otherwise.
        let tower = "vision_tower.vision_model.post_layernorm.weight";
        assert!(llava.drops(tower, |_| false));
        assert!(!llava.drops(tower, |_| true));
    }

    #[test]
    fn accounting_sorts_every_tensor_into_one_class() {
        let map = NameMap::builtin("llava-1.5-to-mplug-owl2").unwrap();
        let a = [
            "model.layers.0.self_attn.k_proj.multiway.0.weight",
            "model.layers.0.self_attn.k_proj.multiway.1.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.visual_abstractor.visual_fc.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ];
        let b = [
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.mm_projector.0.weight",
            "model.extra.weight",
        ];
        let acc = map.account(a, b);
        assert_eq!(acc.mapped.len(), 1);
        assert_eq!(acc.one_to_many.len(), 1);
        assert_eq!(acc.one_to_many[0].1.len(), 2);
        assert_eq!(
            acc.kept_from_a,
            ["model.visual_abstractor.visual_fc.weight"]
        );
        assert_eq!(acc.dropped_from_b, ["model.mm_projector.0.weight"]);
        assert_eq!(
            acc.unaccounted_a,
            ["model.layers.0.self_attn.q_proj.weight"]
        );
        assert_eq!(acc.unaccounted_b, ["model.extra.weight"]);
        assert_eq!(acc.unaccounted(), 2);
    }

    #[test]
    fn detection_refuses_no_match_and_two_matches() {
        let (a, b) = (Path::new("a"), Path::new("b"));
        // Same names on both sides: only identity fits (the built-in maps'
        // rules fire on nothing, so they do not count).
        let names = ["model.layers.0.mlp.up_proj.weight"];
        let (map, _) = NameMap::detect(names, names, a, b).unwrap();
        assert_eq!(map.source, "identity");
        // An original-layout vision tower both the mPLUG-Owl2 and the
        // ShareGPT4V → LLaVA maps drop: two maps fit, `auto` cannot choose.
        let e = NameMap::detect(
            names,
            [
                "model.layers.0.mlp.up_proj.weight",
                "model.vision_tower.x.weight",
            ],
            a,
            b,
        )
        .unwrap_err();
        assert!(
            e.message()
                .contains("`llava-1.5-to-mplug-owl2`, `sharegpt4v-to-llava`"),
            "{e}"
        );
        // Nothing fits: the nearest map and its first unaccounted tensors.
        let e = NameMap::detect(["x.weight"], ["y.weight"], a, b).unwrap_err();
        assert!(
            e.message()
                .contains("nearest `identity` leaves 2 unaccounted"),
            "{e}"
        );
        assert!(e.message().contains("B `y.weight`, A `x.weight`"), "{e}");
        // One fits: only the mPLUG-Owl2 map feeds both k_proj copies.
        let (map, acc) = NameMap::detect(
            [
                "model.layers.0.self_attn.k_proj.multiway.0.weight",
                "model.layers.0.self_attn.k_proj.multiway.1.weight",
                "lm_head.weight",
            ],
            [
                "language_model.model.layers.0.self_attn.k_proj.weight",
                "language_model.lm_head.weight",
                "multi_modal_projector.linear_1.weight",
            ],
            a,
            b,
        )
        .unwrap();
        assert_eq!(map.source, "llava-hf-to-mplug-owl2");
        assert_eq!(acc.one_to_many.len(), 1);
        assert_eq!(
            acc.dropped_from_b,
            ["multi_modal_projector.linear_1.weight"]
        );
    }

    #[test]
    fn sharegpt4v_and_llava_differ_by_the_stored_vision_tower() {
        let (a, b) = (Path::new("a"), Path::new("b"));
        let lm = [
            "model.layers.0.mlp.up_proj.weight",
            "model.mm_projector.0.weight",
            "lm_head.weight",
        ];
        let tower = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight";
        let with_tower: Vec<&str> = lm.iter().copied().chain([tower]).collect();
        let (map, acc) = NameMap::detect(lm, with_tower.clone(), a, b).unwrap();
        assert_eq!(map.source, "sharegpt4v-to-llava");
        assert_eq!(acc.dropped_from_b, [tower]);
        assert_eq!(acc.mapped.len(), 3);
        let (map, acc) = NameMap::detect(with_tower.clone(), lm, a, b).unwrap();
        assert_eq!(map.source, "llava-to-sharegpt4v");
        assert_eq!(acc.kept_from_a, [tower]);
        // Both store it: the same layout, the identity.
        let (map, _) = NameMap::detect(with_tower.clone(), with_tower, a, b).unwrap();
        assert_eq!(map.source, "identity");
    }

    #[test]
    fn first_rule_wins_and_patterns_match_whole_names() {
        let map = NameMap::new(
            "test",
            &[
                RawRule {
                    pattern: r"a\.(\d+)".into(),
                    replace: Replacement::One("x.$1".into()),
                    concat: Vec::new(),
                },
                RawRule {
                    pattern: r"a\..*".into(),
                    replace: Replacement::Drop,
                    concat: Vec::new(),
                },
            ],
        )
        .unwrap();
        assert_eq!(map.apply("a.3"), ["x.3"]);
        assert!(map.apply("a.b").is_empty());
        assert_eq!(map.apply("za.3"), ["za.3"], "not a whole-name match");
        let bad = NameMap::new(
            "t",
            &[RawRule {
                pattern: "(".into(),
                replace: Replacement::Drop,
                concat: Vec::new(),
            }],
        );
        assert!(bad.unwrap_err().to_string().contains("invalid pattern"));
    }

    /// One CogVLM decoder layer's tensors (THUDM/cogvlm-chat-hf), the
    /// global ones and a few of its vision tower's.
    fn cogvlm_names() -> Vec<String> {
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".into(),
            "lm_head.weight".into(),
            "model.vision.boi".into(),
            "model.vision.linear_proj.gate_proj.weight".into(),
            "model.vision.transformer.layers.0.attention.query_key_value.weight".into(),
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        ];
        for t in [
            "self_attn.language_expert_query_key_value",
            "self_attn.vision_expert_query_key_value",
            "self_attn.language_expert_dense",
            "self_attn.vision_expert_dense",
            "mlp.language_mlp.gate_proj",
            "mlp.language_mlp.up_proj",
            "mlp.language_mlp.down_proj",
            "mlp.vision_mlp.gate_proj",
            "mlp.vision_mlp.up_proj",
            "mlp.vision_mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            names.push(format!("model.layers.0.{t}.weight"));
        }
        names
    }

    /// A LLaMA language model's tensors (one layer) under `prefix`, and
    /// `lm_head` as `head`.
    fn llama_names(prefix: &str, head: &str) -> Vec<String> {
        let mut names = vec![
            format!("{prefix}embed_tokens.weight"),
            format!("{prefix}norm.weight"),
            head.to_string(),
        ];
        for t in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            names.push(format!("{prefix}layers.0.{t}.weight"));
        }
        names
    }

    fn owl2_names() -> Vec<String> {
        let mut names: Vec<String> = llama_names("model.", "lm_head.weight")
            .into_iter()
            .flat_map(|n| {
                let split = ["k_proj", "v_proj", "layernorm"]
                    .iter()
                    .any(|s| n.contains(s));
                if split {
                    let base = n.trim_end_matches(".weight").to_string();
                    vec![
                        format!("{base}.multiway.0.weight"),
                        format!("{base}.multiway.1.weight"),
                    ]
                } else {
                    vec![n]
                }
            })
            .collect();
        names.push("model.vision_model.embeddings.cls_token".into());
        names.push("model.visual_abstractor.vit_eos".into());
        names
    }

    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn cogvlm_maps_stack_q_k_v_and_feed_both_experts() {
        let map = NameMap::builtin("llava-1.5-to-cogvlm").unwrap();
        let stacks = map.concatenations(["model.layers.3.self_attn.q_proj.weight"]);
        assert_eq!(
            stacks,
            [Concatenation {
                name: "model.layers.3.self_attn.{q_proj,k_proj,v_proj}.weight".into(),
                parts: vec![
                    "model.layers.3.self_attn.q_proj.weight".into(),
                    "model.layers.3.self_attn.k_proj.weight".into(),
                    "model.layers.3.self_attn.v_proj.weight".into(),
                ],
                targets: vec![
                    "model.layers.3.self_attn.language_expert_query_key_value.weight".into(),
                    "model.layers.3.self_attn.vision_expert_query_key_value.weight".into(),
                ],
            }]
        );
        assert_eq!(
            map.apply("model.layers.3.self_attn.o_proj.weight"),
            [
                "model.layers.3.self_attn.language_expert_dense.weight",
                "model.layers.3.self_attn.vision_expert_dense.weight"
            ]
        );
        assert_eq!(
            map.apply("model.layers.3.mlp.down_proj.weight"),
            [
                "model.layers.3.mlp.language_mlp.down_proj.weight",
                "model.layers.3.mlp.vision_mlp.down_proj.weight"
            ]
        );
        assert!(map.keeps("model.vision.transformer.layers.0.mlp.fc1.weight"));
        // Either llava-hf naming stacks its own parts.
        let hf = NameMap::builtin("llava-hf-to-cogvlm").unwrap();
        for prefix in ["language_model.model.", "model.language_model."] {
            let c = &hf
                .concatenations([format!("{prefix}layers.1.self_attn.q_proj.weight").as_str()])[0];
            assert_eq!(
                c.parts[2],
                format!("{prefix}layers.1.self_attn.v_proj.weight")
            );
            assert_eq!(c.targets.len(), 2);
            assert_eq!(
                hf.apply(&format!("{prefix}layers.1.input_layernorm.weight")),
                ["model.layers.1.input_layernorm.weight"]
            );
        }
        // mPLUG-Owl2: the shared q with each modality's k and v.
        let owl = NameMap::builtin("mplug-owl2-to-cogvlm").unwrap();
        let stacks = owl.concatenations(["model.layers.0.self_attn.q_proj.weight"]);
        assert_eq!(stacks.len(), 2);
        assert_eq!(
            stacks[0].name,
            "model.layers.0.self_attn.{q_proj,k_proj.multiway.0,v_proj.multiway.0}.weight"
        );
        assert_eq!(
            stacks[0].targets,
            ["model.layers.0.self_attn.language_expert_query_key_value.weight"]
        );
        assert_eq!(
            stacks[1].parts[1],
            "model.layers.0.self_attn.k_proj.multiway.1.weight"
        );
        assert_eq!(
            stacks[1].targets,
            ["model.layers.0.self_attn.vision_expert_query_key_value.weight"]
        );
        assert_eq!(
            owl.apply("model.layers.0.post_attention_layernorm.multiway.0.weight"),
            ["model.layers.0.post_attention_layernorm.weight"]
        );
        assert!(owl
            .apply("model.layers.0.input_layernorm.multiway.1.weight")
            .is_empty());
    }

    #[test]
    fn cogvlm_accounting_counts_every_tensor_and_auto_finds_each_map() {
        let (a, b) = (Path::new("a"), Path::new("b"));
        let cog = cogvlm_names();
        let llava = {
            let mut v = llama_names("model.", "lm_head.weight");
            v.push("model.mm_projector.0.weight".into());
            v.push("model.layers.0.self_attn.rotary_emb.inv_freq".into());
            v
        };
        let hf_saved = {
            let mut v = llama_names("language_model.model.", "language_model.lm_head.weight");
            v.push("multi_modal_projector.linear_1.weight".into());
            v.push("vision_tower.vision_model.post_layernorm.weight".into());
            v
        };
        let hf_memory = llama_names("model.language_model.", "lm_head.weight");
        for (names, expected, dropped) in [
            (llava, "llava-1.5-to-cogvlm", 2),
            (hf_saved, "llava-hf-to-cogvlm", 2),
            (hf_memory, "llava-hf-to-cogvlm", 0),
        ] {
            let (map, acc) = NameMap::detect(strs(&cog), strs(&names), a, b).unwrap();
            assert_eq!(map.source, expected);
            // Embedding, norm, lm_head and the layer's two norms by name;
            // o_proj and the MLP into both experts; q, k, v as one stack
            // into both qkv; A's vision tower and rotary buffer kept.
            assert_eq!(acc.mapped.len(), 5, "{expected}");
            assert_eq!(acc.one_to_many.len(), 4);
            assert_eq!(acc.concatenated.len(), 1);
            assert_eq!(acc.stacked_parts().len(), 3);
            assert_eq!(acc.dropped_from_b.len(), dropped);
            assert_eq!(acc.kept_from_a.len(), 4);
            assert_eq!(
                acc.mapped.len()
                    + acc.one_to_many.len()
                    + acc.stacked_parts().len()
                    + acc.dropped_from_b.len(),
                names.len(),
                "every tensor of B in one class"
            );
        }
        let owl = owl2_names();
        // Receiver and contributor swapped: the map that fits the other way round.
        let e = NameMap::detect(strs(&owl), strs(&cog), a, b).unwrap_err();
        assert!(
            e.message().contains(
                "but `mplug-owl2-to-cogvlm` does with the two the other way round: list b first"
            ),
            "{e}"
        );
        let (map, acc) = NameMap::detect(strs(&cog), strs(&owl), a, b).unwrap();
        assert_eq!(map.source, "mplug-owl2-to-cogvlm");
        // Embedding, norm, lm_head, the text copies of both norms.
        assert_eq!(acc.mapped.len(), 5);
        assert_eq!(acc.one_to_many.len(), 4);
        assert_eq!(acc.concatenated.len(), 2);
        assert_eq!(acc.stacked_parts().len(), 5, "q once, four k/v copies");
        // The image copies of the norms and the two vision modules.
        assert_eq!(acc.dropped_from_b.len(), 4);
        assert_eq!(
            5 + 4 + 5 + 4,
            owl.len(),
            "every tensor of mPLUG-Owl2 in one class"
        );
        // Without B's v_proj: q and k have no stack, and A's two fused qkv
        // no source.
        let map = NameMap::builtin("llava-1.5-to-cogvlm").unwrap();
        let partial: Vec<String> = llama_names("model.", "lm_head.weight")
            .into_iter()
            .filter(|n| !n.contains("v_proj"))
            .collect();
        let acc = map.account(strs(&cog), strs(&partial));
        assert_eq!(
            acc.unaccounted_b,
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight"
            ]
        );
        assert_eq!(
            acc.unaccounted_a,
            [
                "model.layers.0.self_attn.language_expert_query_key_value.weight",
                "model.layers.0.self_attn.vision_expert_query_key_value.weight"
            ]
        );
        assert!(acc.concatenated.is_empty());
    }

    #[test]
    fn stacked_names_factor_out_whole_segments() {
        let s = |v: &[&str]| stacked_name(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["a.q.w", "a.k.w"]), "a.{q,k}.w");
        // `q_proj` and `qk_proj` share `q` but not a whole segment.
        assert_eq!(s(&["l.q_proj.w", "l.qk_proj.w"]), "l.{q_proj,qk_proj}.w");
        assert_eq!(s(&["x", "y"]), "{x,y}");
        assert_eq!(s(&["only"]), "{only}");
    }

    #[test]
    fn concat_rules_load_from_yaml_and_need_targets() {
        let rules: Vec<RawRule> = serde_saphyr::from_str(
            "- pattern: 'l\\.(\\d+)\\.q'\n  concat: ['l.$1.q', 'l.$1.k']\n  replace: 'l.$1.qk'\n",
        )
        .unwrap();
        let map = NameMap::new("file", &rules).unwrap();
        let acc = map.account(["l.0.qk"], ["l.0.q", "l.0.k"]);
        assert_eq!(acc.concatenated[0].name, "l.0.{q,k}");
        assert_eq!(acc.unaccounted(), 0);
        let bad: Vec<RawRule> =
            serde_saphyr::from_str("- pattern: 'q'\n  concat: ['q', 'k']\n").unwrap();
        let e = NameMap::new("file", &bad).unwrap_err();
        assert!(e.to_string().contains("needs `replace`"), "{e}");
    }
}
