//! `tokenizer_source:` and the `tokenizer:` block as mergekit writes them:
//! which vocabulary the output gets, and where the embedding rows of the
//! tokens a model lacks come from. [`crate::vocab`] builds the vocabulary
//! and the row maps from what is validated here.

use super::{config_error, model_reference, ModelRef, ParamValue, RawConfig};
use crate::error::Result;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;
use std::fmt;
use std::path::Path;

/// `tokenizer:` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenizer {
    /// `base`, `union` (mergekit's default for this block) or a model.
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    /// Per-token settings, in the order written (new tokens are numbered in it).
    #[serde(default)]
    pub tokens: Option<Spanned<OrderedTokens>>,
    /// Pads the vocabulary's row count up to a multiple of this.
    #[serde(default)]
    pub pad_to_multiple_of: Option<Spanned<ParamValue>>,
}

/// `tokens:`: token text to its settings, in file order (a map type would
/// sort them, and the order numbers the tokens the output adds).
#[derive(Debug, Clone, Default)]
pub struct OrderedTokens(pub Vec<(String, RawTokenSettings)>);

impl<'de> Deserialize<'de> for OrderedTokens {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = OrderedTokens;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from token text to its settings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((token, settings)) = map.next_entry::<String, RawTokenSettings>()? {
                    if out.iter().any(|(t, _)| *t == token) {
                        return Err(serde::de::Error::custom(format!(
                            "token {token:?} is listed twice"
                        )));
                    }
                    out.push((token, settings));
                }
                Ok(OrderedTokens(out))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// One token's settings as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenSettings {
    /// Where its row comes from; absent: mergekit's default rule.
    #[serde(default)]
    pub source: Option<RawTokenOrigin>,
    /// Every model takes the `source` row, even a model that has the token.
    #[serde(default)]
    pub force: bool,
}

/// A token's `source:` as written: a model, or `{kind: zero}` /
/// `{kind: model_token, model, token | token_id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawTokenOrigin {
    /// The token's own row in that model.
    Model(String),
    /// A `kind:` mapping.
    Kind(RawTokenKind),
}

/// The `kind:` form of a token's source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenKind {
    /// `zero` or `model_token`.
    pub kind: String,
    /// For `model_token`: the model.
    #[serde(default)]
    pub model: Option<String>,
    /// For `model_token`: the row's token id in that model…
    #[serde(default)]
    pub token_id: Option<i64>,
    /// …or the token whose row it is.
    #[serde(default)]
    pub token: Option<String>,
}

/// Which vocabulary the output gets.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// The base model's (without a base: the first model's).
    Base,
    /// The base model's tokenizer with every other model's tokens added.
    Union,
    /// This model's tokenizer (it need not be one of the merged models).
    Model(ModelRef),
}

/// Where a token's row comes from, for the models that take it.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenOrigin {
    /// mergekit's default: the base model's row, else the one model that
    /// has the token, else the mean of those that have it, else zero.
    Default,
    /// Zeros.
    Zero,
    /// The token's row in this model (which must have it).
    Model(ModelRef),
    /// Another token's row in this model.
    ModelToken {
        /// The model.
        model: ModelRef,
        /// The row: a token id of that model, or a token of its vocabulary.
        token: TokenKey,
    },
}

/// A row of a model named by id or by token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKey {
    /// A token id of the model.
    Id(u32),
    /// A token of the model's vocabulary.
    Text(String),
}

/// One entry of `tokenizer.tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRule {
    /// The token (added to the vocabulary when it has none of it).
    pub token: String,
    /// Its row's origin.
    pub origin: TokenOrigin,
    /// Every model takes the origin's row, even one that has the token.
    pub force: bool,
}

/// A validated `tokenizer_source` / `tokenizer:` setting.
#[derive(Debug, Clone, PartialEq)]
pub struct VocabularyConfig {
    /// The output's vocabulary.
    pub source: TokenizerSource,
    /// Per-token settings, in config order.
    pub tokens: Vec<TokenRule>,
    /// Row count rounded up to a multiple of this (padding rows are each
    /// model's mean row, as mergekit does).
    pub pad_to_multiple_of: Option<usize>,
}

fn model(base_dir: &Path, text: &str) -> ModelRef {
    let (path, lora) = model_reference(base_dir, text);
    ModelRef {
        path,
        stats: None,
        grams: None,
        window: None,
        lora,
    }
}

fn source(base_dir: &Path, text: &str) -> TokenizerSource {
    match text {
        "base" => TokenizerSource::Base,
        "union" => TokenizerSource::Union,
        other => TokenizerSource::Model(model(base_dir, other)),
    }
}

/// The vocabulary setting of a config, if it has one.
pub(crate) fn vocabulary(raw: &RawConfig, base_dir: &Path) -> Result<Option<VocabularyConfig>> {
    match (&raw.tokenizer_source, &raw.tokenizer) {
        (None, None) => Ok(None),
        (Some(_), Some(block)) => Err(config_error(
            Some(&block.referenced),
            "tokenizer",
            "a config sets either `tokenizer_source` or the `tokenizer:` block, not both (as in mergekit)",
        )),
        (Some(s), None) => match &s.value {
            ParamValue::Text(text) => Ok(Some(VocabularyConfig {
                source: source(base_dir, text),
                tokens: Vec::new(),
                pad_to_multiple_of: None,
            })),
            other => Err(config_error(
                Some(&s.referenced),
                "tokenizer_source",
                format!("expected `base`, `union` or a model, found {other}"),
            )),
        },
        (None, Some(block)) => block_config(&block.value, base_dir).map(Some),
    }
}

fn block_config(block: &RawTokenizer, base_dir: &Path) -> Result<VocabularyConfig> {
    let pad_to_multiple_of = match &block.pad_to_multiple_of {
        None => None,
        Some(v) => match v.value {
            ParamValue::Number(x) if x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => {
                Some(x as usize)
            }
            ref other => {
                return Err(config_error(
                    Some(&v.referenced),
                    "tokenizer.pad_to_multiple_of",
                    format!("expected a positive whole number, found {other}"),
                ))
            }
        },
    };
    let mut tokens = Vec::new();
    if let Some(list) = &block.tokens {
        for (token, settings) in &list.value.0 {
            let key = format!("tokenizer.tokens.{token:?}.source");
            let at = Some(&list.referenced);
            if token.is_empty() {
                return Err(config_error(at, "tokenizer.tokens", "a token is empty"));
            }
            let origin = match &settings.source {
                None => TokenOrigin::Default,
                Some(RawTokenOrigin::Model(m)) => TokenOrigin::Model(model(base_dir, m)),
                Some(RawTokenOrigin::Kind(k)) => match k.kind.as_str() {
                    "zero" if k.model.is_none() && k.token.is_none() && k.token_id.is_none() => {
                        TokenOrigin::Zero
                    }
                    "zero" => {
                        return Err(config_error(
                            at,
                            &key,
                            "`kind: zero` takes no `model`, `token` or `token_id`",
                        ))
                    }
                    "model_token" => {
                        let Some(m) = &k.model else {
                            return Err(config_error(
                                at,
                                &key,
                                "`kind: model_token` needs `model`",
                            ));
                        };
                        let token = match (&k.token, k.token_id) {
                            (Some(t), None) => TokenKey::Text(t.clone()),
                            (None, Some(id)) if (0..=u32::MAX as i64).contains(&id) => {
                                TokenKey::Id(id as u32)
                            }
                            (None, Some(id)) => {
                                return Err(config_error(
                                    at,
                                    &key,
                                    format!("`token_id` {id} is not a token id"),
                                ))
                            }
                            _ => return Err(config_error(
                                at,
                                &key,
                                "`kind: model_token` needs exactly one of `token` and `token_id`",
                            )),
                        };
                        TokenOrigin::ModelToken {
                            model: model(base_dir, m),
                            token,
                        }
                    }
                    other => {
                        return Err(config_error(
                            at,
                            &key,
                            format!("unknown `kind: {other}`; expected `zero` or `model_token`"),
                        ))
                    }
                },
            };
            tokens.push(TokenRule {
                token: token.clone(),
                origin,
                force: settings.force,
            });
        }
    }
    Ok(VocabularyConfig {
        source: match &block.source {
            None => TokenizerSource::Union,
            Some(s) => source(base_dir, &s.value),
        },
        tokens,
        pad_to_multiple_of,
    })
}
