//! The output vocabulary of a merge (`tokenizer_source:` / `tokenizer:`,
//! mergekit's semantics), and each model's embedding and output rows
//! mapped into it.
//!
//! - **Vocabulary.** `base`: the base model's tokenizer (without a base,
//!   the first model's). `union`: that tokenizer plus every other model's
//!   tokens, added in model order (base first, then config order) and
//!   within a model by token id; tokens a model's tokenizer lists as added
//!   tokens are added as such, with their flags, the first model's winning.
//!   A model: that model's tokenizer. Tokens named in `tokenizer.tokens`
//!   are added when missing. Tokenizers are read and written with Hugging
//!   Face `tokenizers`; a model directory without `tokenizer.json` is taken
//!   to have the vocabulary of the tokenizer's source (as mergekit does).
//! - **Rows.** Every model's tensors named like an embedding or output
//!   head (`embed_tokens`, `lm_head`, …) get one row per output token: the
//!   model's own row when it has the token; else, in mergekit's order, the
//!   base model's row, else the one model that has it, else the mean of
//!   those that have it, else zeros. A `tokenizer.tokens` entry sets a
//!   token's source instead (`force`: for every model, even one that has
//!   the token). Padding rows (`pad_to_multiple_of`) are each model's mean
//!   row. The rows are read through [`crate::io::rows`], never copied.
//!
//! Differences from mergekit: new tokens are numbered deterministically (in
//! mergekit they follow Python's dict order of each vocabulary); means are
//! taken in f32 (mergekit: in the tensors' dtype); tokens of a tokenizer
//! whose id is past its model's rows are left out of that model rather than
//! stripped from the tokenizer; tokenizers of different kinds (byte-level
//! BPE, SentencePiece, WordPiece, …) are refused, since the same word is
//! spelled differently in each.

use crate::config::tokenizer::{TokenKey, TokenOrigin, TokenRule, TokenizerSource};
use crate::config::{MergeConfig, ModelRef};
use crate::error::{Error, ErrorKind, Result};
use crate::io::rows::{RowMap, RowMaps, RowSource};
use crate::io::Checkpoint;
use crate::plan::Inputs;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::{AddedToken, Tokenizer};

/// The tokenizer file a vocabulary is read from and written to.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tensor names (their last components) that hold one row per token.
const ROW_TENSORS: [&str; 8] = [
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
    "tok_embeddings.weight",
    "shared.weight",
];

/// Whether `name` is a tensor with one row per token.
pub fn is_row_tensor(name: &str) -> bool {
    ROW_TENSORS.iter().any(|t| {
        name.strip_suffix(t)
            .is_some_and(|prefix| prefix.is_empty() || prefix.ends_with('.'))
    })
}

/// One model's tokens.
#[derive(Debug)]
struct ModelTokens {
    path: PathBuf,
    lora: Option<PathBuf>,
    /// Its `tokenizer.json`; `None`: taken to be the source's.
    file: Option<PathBuf>,
    vocab: HashMap<String, u32>,
}

impl ModelTokens {
    fn is(&self, model: &ModelRef) -> bool {
        crate::config::same_model(&self.path, &model.path) && self.lora == model.lora
    }
}

/// A token the output's tokenizer adds, as `tokenizer_config.json` lists it.
#[derive(Debug, Clone)]
struct Added {
    id: u32,
    token: AddedToken,
}

/// A merge's output vocabulary and what each model has of it.
#[derive(Debug)]
pub struct Vocabulary {
    label: String,
    /// The directory the output's tokenizer files come from.
    tokenizer_dir: PathBuf,
    /// The output's `tokenizer.json` when it differs from the source's.
    rebuilt: Option<String>,
    /// Output token by id (`None`: an id the tokenizer does not use).
    tokens: Vec<Option<String>>,
    /// Rows of every mapped tensor: the tokens, padded.
    rows: usize,
    added: Vec<Added>,
    models: Vec<ModelTokens>,
    /// The base model's index in `models`, if the merge has one.
    base: Option<usize>,
    rules: Vec<TokenRule>,
}

/// The directory of a model reference (a file's is its parent).
fn model_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    }
}

fn load(file: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(file).map_err(|e| {
        Error::new(ErrorKind::Format, format!("cannot read the tokenizer: {e}")).with_file(file)
    })
}

/// How a tokenizer spells its tokens: its model type and, for BPE and
/// Unigram, byte-level or SentencePiece (`▁` for spaces).
fn kind(file: &Path) -> Result<String> {
    let text = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let value: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::new(ErrorKind::Format, format!("not JSON: {e}")).with_file(file))?;
    let model = value
        .pointer("/model/type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            // Old files leave the type out; a BPE model has `merges`.
            if value.pointer("/model/merges").is_some() {
                "BPE".into()
            } else {
                "unknown".into()
            }
        });
    let pipeline: String = ["normalizer", "pre_tokenizer", "decoder"]
        .iter()
        .filter_map(|k| value.get(k))
        .map(Value::to_string)
        .collect();
    let spelling = if pipeline.contains("ByteLevel") {
        " (byte-level)"
    } else if pipeline.contains("Metaspace") || pipeline.contains('▁') {
        " (SentencePiece)"
    } else {
        ""
    };
    Ok(format!("{model}{spelling}"))
}

/// Every model the config reads, base first, each once.
fn referenced(config: &MergeConfig) -> Vec<ModelRef> {
    let mut out: Vec<ModelRef> = Vec::new();
    let parts = std::iter::once(config).chain(&config.slices);
    for part in parts {
        for m in part.base.iter().chain(&part.models) {
            if !out
                .iter()
                .any(|o| crate::config::same_model(&o.path, &m.path) && o.lora == m.lora)
            {
                out.push(m.clone());
            }
        }
    }
    out
}

impl Vocabulary {
    /// The vocabulary `config` asks for, or `None` when it asks for none;
    /// also `None` for `tokenizer_source: base` when the base has no
    /// `tokenizer.json` (its tokenizer files are then copied as they are).
    /// Errors name the tokenizer file and the problem.
    pub fn build(config: &MergeConfig) -> Result<Option<Vocabulary>> {
        let Some(wanted) = &config.vocabulary else {
            return Ok(None);
        };
        if config.method.uses_probe_set() || config.method.uses_name_map() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{} merges models whose rows line up already (or maps their names); `tokenizer_source` and `tokenizer:` are for mergekit-style methods",
                    config.method.as_str()
                ),
            )
            .with_tensor("tokenizer_source"));
        }
        let models = referenced(config);
        // A missing input is that error, not a missing tokenizer beside it.
        if let Some(m) = models.iter().find(|m| !m.path.exists()) {
            return Err(
                Error::new(ErrorKind::NotFound, "no such file or directory").with_file(&m.path)
            );
        }
        let base_ref = config.base.clone().unwrap_or_else(|| models[0].clone());
        let source_ref = match &wanted.source {
            TokenizerSource::Base | TokenizerSource::Union => &base_ref,
            TokenizerSource::Model(m) => m,
        };
        let source_dir = model_dir(&source_ref.path);
        let source_file = source_dir.join(TOKENIZER_FILE);
        if !source_file.is_file() {
            if wanted.source == TokenizerSource::Base && wanted.tokens.is_empty() {
                return Ok(None);
            }
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "`{}` needs the tokenizer's {TOKENIZER_FILE}, and there is none",
                    label(&wanted.source)
                ),
            )
            .with_file(source_file));
        }
        let source = load(&source_file)?;
        let source_kind = kind(&source_file)?;
        let mut tokens = Vec::with_capacity(models.len());
        for m in &models {
            let file = model_dir(&m.path).join(TOKENIZER_FILE);
            let (file, vocab, tokenizer) = if file.is_file() {
                let tokenizer = load(&file)?;
                let found = kind(&file)?;
                if found != source_kind {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "is a {found} tokenizer, but the output's ({}) is {source_kind}; the same word is spelled differently in each, so their tokens cannot be merged",
                            source_file.display()
                        ),
                    )
                    .with_file(&file));
                }
                (Some(file), tokenizer.get_vocab(true), Some(tokenizer))
            } else {
                (None, source.get_vocab(true), None)
            };
            tokens.push((
                ModelTokens {
                    path: m.path.clone(),
                    lora: m.lora.clone(),
                    file,
                    vocab,
                },
                tokenizer,
            ));
        }
        let base = config
            .base
            .as_ref()
            .and_then(|b| tokens.iter().position(|(t, _)| t.is(b)));
        let mut out = source.clone();
        if wanted.source == TokenizerSource::Union {
            union_into(&mut out, &tokens);
        }
        let missing: Vec<AddedToken> = wanted
            .tokens
            .iter()
            .map(|r| AddedToken::from(r.token.clone(), false))
            .collect();
        out.add_tokens(&missing);
        let vocab = out.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut by_id: Vec<Option<String>> = vec![None; size];
        for (token, &id) in &vocab {
            by_id[id as usize] = Some(token.clone());
        }
        let before = source.get_vocab(true);
        let decoder = out.get_added_tokens_decoder();
        let mut added: Vec<Added> = vocab
            .iter()
            .filter(|(t, _)| !before.contains_key(*t))
            .filter_map(|(_, &id)| {
                decoder.get(&id).map(|token| Added {
                    id,
                    token: token.clone(),
                })
            })
            .collect();
        added.sort_by_key(|a| a.id);
        let rebuilt = match added.is_empty() {
            true => None,
            false => Some(out.to_string(true).map_err(|e| {
                Error::new(
                    ErrorKind::Format,
                    format!("cannot write the merged tokenizer: {e}"),
                )
                .with_file(&source_file)
            })?),
        };
        let rows = match wanted.pad_to_multiple_of {
            Some(p) => size.div_ceil(p) * p,
            None => size,
        };
        for rule in &wanted.tokens {
            let referenced = match &rule.origin {
                TokenOrigin::Model(m) | TokenOrigin::ModelToken { model: m, .. } => Some(m),
                _ => None,
            };
            if let Some(m) = referenced {
                if !tokens.iter().any(|(t, _)| t.is(m)) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "takes its row from {}, which is not one of the merged models",
                            m.path.display()
                        ),
                    )
                    .with_tensor(format!("tokenizer.tokens.{:?}", rule.token)));
                }
            }
        }
        Ok(Some(Vocabulary {
            label: label(&wanted.source),
            tokenizer_dir: source_dir,
            rebuilt,
            tokens: by_id,
            rows,
            added,
            models: tokens.into_iter().map(|(t, _)| t).collect(),
            base,
            rules: wanted.tokens.clone(),
        }))
    }

    /// Rows of every mapped tensor (the tokens, padded).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The output's tokens (the largest id plus one).
    pub fn size(&self) -> usize {
        self.tokens.len()
    }

    /// The directory the output's tokenizer files come from.
    pub fn tokenizer_dir(&self) -> &Path {
        &self.tokenizer_dir
    }

    /// The output's `tokenizer.json`, when it is not the source's file.
    pub fn rebuilt(&self) -> Option<&str> {
        self.rebuilt.as_deref()
    }

    fn model_index(&self, model: &ModelRef) -> Option<usize> {
        self.models.iter().position(|t| t.is(model))
    }

    /// The row of output token `id` in model `m` (of `rows` rows), if it has it.
    fn own_row(&self, m: usize, id: usize, rows: usize) -> Option<usize> {
        let token = self.tokens[id].as_ref()?;
        let row = *self.models[m].vocab.get(token)? as usize;
        (row < rows).then_some(row)
    }

    /// Maps the row tensors of every input of a merge part into the
    /// vocabulary. Rows come from the part's own models (the base
    /// included). A model whose rows already are the output's keeps its
    /// tensors as they are.
    pub fn map_inputs(&self, part: &MergeConfig, inputs: &mut Inputs) -> Result<()> {
        let part_models: Vec<&ModelRef> = part.base.iter().chain(&part.models).collect();
        // Donors: the part's distinct models, each opened once more (plain,
        // without maps), as vocabulary indices.
        let mut donor_models: Vec<usize> = Vec::new();
        let mut donors = Vec::new();
        for m in &part_models {
            let index = self.model_index(m).expect("every model was read");
            if donor_models.contains(&index) {
                continue;
            }
            let checkpoint = Checkpoint::open(&m.path).and_then(|c| match &m.lora {
                Some(adapter) => c.with_adapter(adapter),
                None => Ok(c),
            })?;
            donor_models.push(index);
            donors.push(checkpoint);
        }
        let donor_of = |m: &ModelRef| -> usize {
            let index = self.model_index(m).expect("every model was read");
            donor_models
                .iter()
                .position(|&d| d == index)
                .expect("a donor")
        };
        let base_donor = part.base.as_ref().map(donor_of);
        let mut sources_by_tensor: HashMap<String, Vec<Option<RowSource>>> = HashMap::new();
        let names: Vec<String> = donors
            .iter()
            .flat_map(|d| d.tensors().iter())
            .filter(|t| t.shape.len() == 2 && is_row_tensor(&t.name))
            .map(|t| t.name.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in &names {
            let fills = self.default_sources(name, &donors, &donor_models, base_donor)?;
            sources_by_tensor.insert(name.clone(), fills);
        }
        let donors = Arc::new(donors);
        let mut inputs_list: Vec<(&ModelRef, &mut crate::plan::Input)> = Vec::new();
        if let (Some(b), Some(input)) = (&part.base, inputs.base.as_mut()) {
            inputs_list.push((b, input));
        }
        for (m, input) in part.models.iter().zip(inputs.models.iter_mut()) {
            inputs_list.push((m, input));
        }
        for (m, input) in inputs_list {
            let own = donor_of(m);
            let mut maps = HashMap::new();
            for name in &names {
                let Some(info) = input.checkpoint.info(name) else {
                    continue;
                };
                let (own_rows, cols) = (info.shape[0], info.shape[1]);
                let defaults = &sources_by_tensor[name];
                let mut identity = own_rows == self.rows;
                let mut sources = Vec::with_capacity(self.rows);
                for (id, default) in defaults.iter().enumerate() {
                    let forced = self.rule(id).is_some_and(|r| r.force);
                    let source = match self.own_row(donor_models[own], id, own_rows) {
                        Some(row) if !forced => RowSource::Row { donor: own, row },
                        _ => default.clone().expect("filled for every token"),
                    };
                    identity &= source
                        == RowSource::Row {
                            donor: own,
                            row: id,
                        };
                    sources.push(source);
                }
                // Padding rows (none of which a model has as its own).
                identity &= self.rows == self.tokens.len();
                sources.resize(self.rows, RowSource::PadMean);
                if identity {
                    continue;
                }
                // Rows come only from donors holding the tensor: each must be as wide.
                let other = donors
                    .iter()
                    .find(|d| d.info(name).is_some_and(|t| t.shape[1] != cols));
                if let Some(d) = other {
                    return Err(Error::new(
                        ErrorKind::Plan,
                        format!(
                            "has {cols} columns, but the rows mapped into it from {} have {}",
                            d.root().display(),
                            d.info(name).expect("found").shape[1]
                        ),
                    )
                    .with_file(input.checkpoint.root())
                    .with_tensor(name));
                }
                maps.insert(name.clone(), RowMap::new(cols, sources, self.tokens.len()));
            }
            if !maps.is_empty() {
                input
                    .checkpoint
                    .set_rows(RowMaps::new(maps, Arc::clone(&donors)));
            }
        }
        Ok(())
    }

    fn rule(&self, id: usize) -> Option<&TokenRule> {
        let token = self.tokens[id].as_ref()?;
        self.rules.iter().find(|r| r.token == *token)
    }

    /// Each output token's row for the models that lack it (or are forced
    /// off their own): its rule's source, else mergekit's default.
    fn default_sources(
        &self,
        name: &str,
        donors: &[Checkpoint],
        donor_models: &[usize],
        base_donor: Option<usize>,
    ) -> Result<Vec<Option<RowSource>>> {
        let rows: Vec<Option<usize>> = donors
            .iter()
            .map(|d| {
                d.info(name)
                    .filter(|t| t.shape.len() == 2)
                    .map(|t| t.shape[0])
            })
            .collect();
        let row_in =
            |d: usize, id: usize| rows[d].and_then(|r| self.own_row(donor_models[d], id, r));
        let donor_of = |m: &ModelRef| {
            let index = self.model_index(m)?;
            donor_models.iter().position(|&d| d == index)
        };
        let mut out = Vec::with_capacity(self.tokens.len());
        for id in 0..self.tokens.len() {
            let present: Vec<(usize, usize)> = (0..donors.len())
                .filter_map(|d| row_in(d, id).map(|r| (d, r)))
                .collect();
            let rule = self.rule(id);
            let rule_error = |problem: String| {
                Error::new(ErrorKind::Config, problem).with_tensor(format!(
                    "tokenizer.tokens.{:?}",
                    rule.map_or("", |r| r.token.as_str())
                ))
            };
            let source = match rule.map(|r| &r.origin) {
                None | Some(TokenOrigin::Default) => match (present.as_slice(), base_donor) {
                    ([], _) => RowSource::Zero,
                    ([(donor, row)], _) => RowSource::Row {
                        donor: *donor,
                        row: *row,
                    },
                    (_, Some(b)) if present.iter().any(|p| p.0 == b) => {
                        let row = present.iter().find(|p| p.0 == b).expect("found").1;
                        RowSource::Row { donor: b, row }
                    }
                    _ => RowSource::Mean(present.clone()),
                },
                Some(TokenOrigin::Zero) => RowSource::Zero,
                Some(TokenOrigin::Model(m)) => {
                    let d = donor_of(m).ok_or_else(|| {
                        rule_error(format!(
                            "takes its row from {}, which is not merged with `{name}`'s models",
                            m.path.display()
                        ))
                    })?;
                    let row = row_in(d, id).ok_or_else(|| {
                        rule_error(format!(
                            "takes its row from {}, which has no such token in `{name}`",
                            m.path.display()
                        ))
                    })?;
                    RowSource::Row { donor: d, row }
                }
                Some(TokenOrigin::ModelToken { model, token }) => {
                    let d = donor_of(model).ok_or_else(|| {
                        rule_error(format!(
                            "takes its row from {}, which is not merged with `{name}`'s models",
                            model.path.display()
                        ))
                    })?;
                    let vocab = &self.models[donor_models[d]].vocab;
                    let row = match token {
                        TokenKey::Id(id) => *id as usize,
                        TokenKey::Text(t) => *vocab.get(t).ok_or_else(|| {
                            rule_error(format!(
                                "takes the row of {t:?} from {}, whose vocabulary has no such token",
                                model.path.display()
                            ))
                        })? as usize,
                    };
                    let have = rows[d].unwrap_or(0);
                    if row >= have {
                        return Err(rule_error(format!(
                            "takes row {row} of `{name}` from {}, which has {have} rows",
                            model.path.display()
                        )));
                    }
                    RowSource::Row { donor: d, row }
                }
            };
            out.push(Some(source));
        }
        Ok(out)
    }

    /// `tokenizer_config.json` with the tokens this merge added listed in
    /// `added_tokens_decoder` (when it has one), so that loaders reading
    /// it agree with `tokenizer.json`; `None` when it is not a JSON object.
    pub fn tokenizer_config(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut value: Value = serde_json::from_slice(text).ok()?;
        let object = value.as_object_mut()?;
        if let Some(decoder) = object
            .get_mut("added_tokens_decoder")
            .and_then(Value::as_object_mut)
        {
            for a in &self.added {
                let t = &a.token;
                decoder.insert(
                    a.id.to_string(),
                    json!({
                        "content": t.content,
                        "lstrip": t.lstrip,
                        "normalized": t.normalized,
                        "rstrip": t.rstrip,
                        "single_word": t.single_word,
                        "special": t.special,
                    }),
                );
            }
        }
        let mut bytes = serde_json::to_vec_pretty(&value).ok()?;
        bytes.push(b'\n');
        Some(bytes)
    }

    /// `config.json` with the vocabulary's row count as `vocab_size` (at
    /// the top and in `text_config`, wherever it is set; at the top when
    /// it is set nowhere); `None` when it is not a JSON object.
    pub fn model_config(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut value: Value = serde_json::from_slice(text).ok()?;
        let nested = value.pointer("/text_config/vocab_size").is_some();
        let object = value.as_object_mut()?;
        if object.contains_key("vocab_size") || !nested {
            object.insert("vocab_size".into(), self.rows.into());
        }
        if let Some(text_config) = object.get_mut("text_config").and_then(Value::as_object_mut) {
            if text_config.contains_key("vocab_size") {
                text_config.insert("vocab_size".into(), self.rows.into());
            }
        }
        let mut bytes = serde_json::to_vec_pretty(&value).ok()?;
        bytes.push(b'\n');
        Some(bytes)
    }

    /// The report's `vocabulary` section: the source, the sizes, the added
    /// tokens, each model's share, and how many tokens each default rule
    /// filled (over all the merge's models).
    pub fn report(&self) -> Value {
        // every model, base model, single model, mean, zero, configured
        let mut rules = [0usize; 6];
        for id in 0..self.tokens.len() {
            let holders: Vec<usize> = (0..self.models.len())
                .filter(|&m| self.own_row(m, id, usize::MAX).is_some())
                .collect();
            let slot = match holders.len() {
                _ if self.rule(id).is_some() => 5,
                n if n == self.models.len() => 0,
                _ if self.base.is_some_and(|b| holders.contains(&b)) => 1,
                1 => 2,
                0 => 4,
                _ => 3,
            };
            rules[slot] += 1;
        }
        let models: Vec<Value> = self
            .models
            .iter()
            .enumerate()
            .map(|(m, t)| {
                let have = (0..self.tokens.len())
                    .filter(|&id| self.own_row(m, id, usize::MAX).is_some())
                    .count();
                json!({
                    "model": t.path,
                    "tokenizer": t.file.as_ref().map_or(
                        Value::String("none: taken to be the output's".into()),
                        |f| Value::String(f.display().to_string())),
                    "tokens": t.vocab.len(),
                    "missing": self.tokens.iter().flatten().count() - have,
                })
            })
            .collect();
        let shown: Vec<&str> = self
            .added
            .iter()
            .take(50)
            .map(|a| a.token.content.as_str())
            .collect();
        json!({
            "source": self.label,
            "tokenizer_from": self.tokenizer_dir,
            "tokens": self.tokens.iter().flatten().count(),
            "rows": self.rows,
            "added_tokens": self.added.len(),
            "added": shown,
            "rows_from": {
                "every_model": rules[0],
                "base_model": rules[1],
                "single_model": rules[2],
                "mean": rules[3],
                "zero": rules[4],
                "configured": rules[5],
                "padding": self.rows - self.tokens.len(),
            },
            "models": models,
        })
    }
}

/// The union: every model's tokens the output lacks, added in order; a
/// model's added tokens keep their flags (the first model's win).
fn union_into(out: &mut Tokenizer, models: &[(ModelTokens, Option<Tokenizer>)]) {
    let have = out.get_vocab(true);
    let mut plain: Vec<AddedToken> = Vec::new();
    let mut special: Vec<AddedToken> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (_, tokenizer) in models {
        let Some(tokenizer) = tokenizer else {
            continue;
        };
        let decoder = tokenizer.get_added_tokens_decoder();
        let mut vocab: Vec<(&String, &u32)> = Vec::new();
        let own = tokenizer.get_vocab(true);
        vocab.extend(own.iter());
        vocab.sort_by_key(|(_, &id)| id);
        for (token, id) in vocab {
            if have.contains_key(token) || !seen.insert(token.clone()) {
                continue;
            }
            match decoder.get(id).filter(|a| a.content == *token) {
                Some(a) if a.special => special.push(a.clone()),
                Some(a) => plain.push(a.clone()),
                None => plain.push(AddedToken::from(token.clone(), false)),
            }
        }
    }
    out.add_tokens(&plain);
    out.add_special_tokens(&special);
}

fn label(source: &TokenizerSource) -> String {
    match source {
        TokenizerSource::Base => "base".into(),
        TokenizerSource::Union => "union".into(),
        TokenizerSource::Model(m) => m.path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_tensors_are_named_like_embeddings_and_heads() {
        assert!(is_row_tensor("model.embed_tokens.weight"));
        assert!(is_row_tensor("lm_head.weight"));
        assert!(is_row_tensor("language_model.lm_head.weight"));
        assert!(is_row_tensor("transformer.wte.weight"));
        assert!(!is_row_tensor("model.layers.0.mlp.up_proj.weight"));
        assert!(!is_row_tensor("model.norm.weight"));
        assert!(!is_row_tensor("xlm_head.weight"));
    }
}
