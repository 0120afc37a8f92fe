//! Name maps (SPEC §5): ordered rules `regex → replacement(s)` that turn a
//! contributor's tensor names into the receiver's. The first rule whose
//! pattern matches the whole name wins; a name no rule matches is used
//! unchanged; a rule may give several replacements (one tensor of B feeds
//! several of A) or none (the tensor is dropped).

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
}

/// A compiled name map.
#[derive(Debug, Clone, Default)]
pub struct NameMap {
    /// Where the map came from (a built-in name, a file, or `config`).
    pub source: String,
    rules: Vec<Rule>,
}

/// The built-in maps, by name.
pub const BUILTIN: [&str; 1] = ["llava-1.5-to-mplug-owl2"];

impl NameMap {
    /// The identity map.
    pub fn identity() -> NameMap {
        NameMap {
            source: "identity".into(),
            rules: Vec::new(),
        }
    }

    /// Compiles rules; an invalid pattern is an error naming it.
    pub fn new(source: &str, rules: &[RawRule]) -> Result<NameMap> {
        let rules = rules
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
                Ok(Rule {
                    pattern,
                    replacements,
                })
            })
            .collect::<Result<_>>()?;
        Ok(NameMap {
            source: source.to_string(),
            rules,
        })
    }

    /// A built-in map by name (see [`BUILTIN`]).
    pub fn builtin(name: &str) -> Option<NameMap> {
        let rules: Vec<RawRule> = match name {
            // LLaVA-1.5 → mPLUG-Owl2 (heterogeneous-pairs.md): one LLaVA
            // tensor feeds both modality copies of k/v and the two norms;
            // LLaVA's projector and vision tower have no place in mPLUG-Owl2.
            "llava-1.5-to-mplug-owl2" => vec![
                rule(
                    r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)\.weight",
                    &[
                        "model.layers.$1.self_attn.$2.multiway.0.weight",
                        "model.layers.$1.self_attn.$2.multiway.1.weight",
                    ],
                ),
                rule(
                    r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
                    &[
                        "model.layers.$1.$2.multiway.0.weight",
                        "model.layers.$1.$2.multiway.1.weight",
                    ],
                ),
                rule(r"model\.mm_projector\..*", &[]),
                rule(r"model\.vision_tower\..*", &[]),
                rule(r".*\.rotary_emb\.inv_freq", &[]),
            ],
            _ => return None,
        };
        NameMap::new(name, &rules).ok()
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
        for rule in &self.rules {
            if let Some(captures) = rule.pattern.captures(name) {
                return rule
                    .replacements
                    .iter()
                    .map(|r| {
                        let mut out = String::new();
                        captures.expand(r, &mut out);
                        out
                    })
                    .collect();
            }
        }
        vec![name.to_string()]
    }
}

fn rule(pattern: &str, replacements: &[&str]) -> RawRule {
    RawRule {
        pattern: pattern.to_string(),
        replace: Replacement::Many(replacements.iter().map(|s| s.to_string()).collect()),
    }
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
    fn first_rule_wins_and_patterns_match_whole_names() {
        let map = NameMap::new(
            "test",
            &[
                RawRule {
                    pattern: r"a\.(\d+)".into(),
                    replace: Replacement::One("x.$1".into()),
                },
                RawRule {
                    pattern: r"a\..*".into(),
                    replace: Replacement::Drop,
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
            }],
        );
        assert!(bad.unwrap_err().to_string().contains("invalid pattern"));
    }
}
