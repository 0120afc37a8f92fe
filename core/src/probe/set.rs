//! Probe sets (SPEC §1.1): JSON Lines, one example per line.
//!
//! ```text
//! {"input": [0.5, -1.25, 3.0], "modality": "text", "source": "sst2"}
//! {"tokens": [1, 3087, 29871, 13], "modality": "vision", "source": "vqa", "meta": {"id": 17}}
//! ```
//!
//! - exactly one of `"input"` (f32 features, for the MLP family),
//!   `"tokens"` (u32 token ids, for language models) and `"text"` (a
//!   string the model's tokenizer turns into tokens), not empty;
//! - `"modality"` (optional, default `"text"`): `"text"`, `"vision"`,
//!   `"audio"` or an integer 0–255 (the code written to `probe.modality`,
//!   SPEC §4);
//! - `"source"` (optional): the task the example comes from; the sampler
//!   draws its quotas per source;
//! - `"token_modality"` (optional, only with `"tokens"`): each token's
//!   modality, an array as long as `tokens` of names or codes as for
//!   `"modality"` (`["text", "vision", "vision", 0]`); models with one
//!   copy of a module per modality route each token by it;
//! - `"meta"` (optional): any JSON value, kept as it is (ids, original
//!   text, …).
//!
//! Any other key is an error (a misspelt key would otherwise be ignored
//! silently). Blank lines are skipped. Example `n` of a probe set (counting
//! from 0, blank lines not counted) is example id `n` of the recorder.
//!
//! The sampler builds the "meta-probe" mixture: from examples of several
//! sources it draws a fixed number per source without replacement, then
//! shuffles the mixture, all from one seed ([`sample_mixture`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::demo::Rng;
use crate::error::{Error, ErrorKind, Result};
use crate::io::write_atomically;

/// Modality code of text (SPEC §4).
pub const TEXT: u8 = 0;
/// Modality code of vision.
pub const VISION: u8 = 1;
/// Modality code of audio.
pub const AUDIO: u8 = 2;

/// The name of a modality code, for the three named ones.
pub fn modality_name(code: u8) -> Option<&'static str> {
    match code {
        TEXT => Some("text"),
        VISION => Some("vision"),
        AUDIO => Some("audio"),
        _ => None,
    }
}

/// The code of a modality name (`text`, `vision`, `audio`).
pub fn parse_modality(name: &str) -> Option<u8> {
    match name {
        "text" => Some(TEXT),
        "vision" => Some(VISION),
        "audio" => Some(AUDIO),
        _ => None,
    }
}

/// What an example feeds the model.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeInput {
    /// Input features (`"input"`), for models that take vectors.
    Features(Vec<f32>),
    /// Token ids (`"tokens"`), for language models.
    Tokens(Vec<u32>),
    /// Plain text (`"text"`), tokenized by the model
    /// ([`super::ProbeModel::tokenize`]).
    Text(String),
}

/// One probe example.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeExample {
    /// What the model is fed.
    pub input: ProbeInput,
    /// Modality code (0 text, 1 vision, 2 audio, …).
    pub modality: u8,
    /// The task the example comes from; empty when the line has none.
    pub source: String,
    /// Each token's modality code (`"token_modality"`), as long as the
    /// tokens; only with [`ProbeInput::Tokens`].
    pub token_modality: Option<Vec<u8>>,
    /// The line's `"meta"` value, if any, kept verbatim.
    pub meta: Option<Value>,
}

impl ProbeExample {
    /// An example of input features, text modality, no source.
    pub fn features(input: Vec<f32>) -> ProbeExample {
        ProbeExample {
            input: ProbeInput::Features(input),
            modality: TEXT,
            source: String::new(),
            token_modality: None,
            meta: None,
        }
    }

    /// An example of token ids, text modality, no source.
    pub fn tokens(tokens: Vec<u32>) -> ProbeExample {
        ProbeExample {
            input: ProbeInput::Tokens(tokens),
            ..ProbeExample::features(Vec::new())
        }
    }

    /// The example as one JSON line (no newline); [`parse_line`] reads it
    /// back to an equal example (f32 values are written in their shortest
    /// exact form).
    pub fn to_json_line(&self) -> String {
        // serde_json writes an f32 in its shortest form, but a `Value`
        // would hold it as f64 (`0.1` → `0.10000000149011612`): serialise
        // the fields one by one.
        let mut line = String::from("{");
        match &self.input {
            ProbeInput::Features(v) => {
                line.push_str("\"input\":");
                line.push_str(&json(v));
            }
            ProbeInput::Tokens(v) => {
                line.push_str("\"tokens\":");
                line.push_str(&json(v));
            }
            ProbeInput::Text(t) => {
                line.push_str("\"text\":");
                line.push_str(&json(t));
            }
        }
        line.push_str(",\"modality\":");
        push_modality(&mut line, self.modality);
        if let Some(codes) = &self.token_modality {
            line.push_str(",\"token_modality\":[");
            for (i, &m) in codes.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                push_modality(&mut line, m);
            }
            line.push(']');
        }
        if !self.source.is_empty() {
            line.push_str(",\"source\":");
            line.push_str(&json(&self.source));
        }
        if let Some(meta) = &self.meta {
            line.push_str(",\"meta\":");
            line.push_str(&meta.to_string());
        }
        line.push('}');
        line
    }
}

/// Appends a modality: its name when it has one, else its code.
fn push_modality(line: &mut String, code: u8) {
    match modality_name(code) {
        Some(name) => line.push_str(&json(name)),
        None => line.push_str(&code.to_string()),
    }
}

/// A modality given as a name (`text`, `vision`, `audio`) or a code 0–255.
pub fn modality_value(value: &Value) -> Option<u8> {
    match value {
        Value::String(name) => parse_modality(name),
        v => v.as_u64().and_then(|m| u8::try_from(m).ok()),
    }
}

/// `value` in JSON (plain values: serialising cannot fail).
fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// serde_json's message without its " at line L column C" (our lines are
/// numbered in the file, not in the one-line document).
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Parses one line of a probe set. The error says what is wrong, without
/// the line number (callers add it).
pub fn parse_line(line: &str) -> std::result::Result<ProbeExample, String> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| format!("column {}: {}", e.column(), json_message(&e)))?;
    let Value::Object(mut obj) = value else {
        return Err("an example must be a JSON object".into());
    };
    if let Some(key) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "input" | "tokens" | "text" | "modality" | "token_modality" | "source" | "meta"
        )
    }) {
        return Err(format!(
            "unknown key `{key}` (expected `input`, `tokens` or `text`, `modality`, \
             `token_modality`, `source`, `meta`)"
        ));
    }
    let given: Vec<&str> = ["input", "tokens", "text"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    if given.len() > 1 {
        return Err(format!("both `{}` and `{}`: give one", given[0], given[1]));
    }
    let input = match (obj.remove("input"), obj.remove("tokens")) {
        (Some(_), Some(_)) => unreachable!("refused above"),
        (None, None) => match obj.remove("text") {
            None => {
                return Err(
                    "no `input` (features), `tokens` (token ids) or `text` (plain text)".into(),
                );
            }
            Some(v) => parse_text(v)?,
        },
        (Some(v), None) => {
            let Value::Array(items) = v else {
                return Err("`input` must be an array of numbers".into());
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let x = item
                    .as_f64()
                    .ok_or_else(|| format!("`input[{i}]` is {item}, not a number"))?;
                let f = x as f32;
                if !f.is_finite() {
                    return Err(format!("`input[{i}]` = {x} is not a finite f32"));
                }
                out.push(f);
            }
            if out.is_empty() {
                return Err("`input` is empty".into());
            }
            ProbeInput::Features(out)
        }
        (None, Some(v)) => {
            let Value::Array(items) = v else {
                return Err("`tokens` must be an array of token ids".into());
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let t = item
                    .as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        format!("`tokens[{i}]` is {item}, not a token id (an integer 0–4294967295)")
                    })?;
                out.push(t);
            }
            if out.is_empty() {
                return Err("`tokens` is empty".into());
            }
            ProbeInput::Tokens(out)
        }
    };
    let modality = match obj.remove("modality") {
        None => TEXT,
        Some(Value::String(name)) => parse_modality(&name).ok_or_else(|| {
            format!("unknown modality `{name}` (expected text, vision, audio or a code 0–255)")
        })?,
        Some(v) => v
            .as_u64()
            .and_then(|m| u8::try_from(m).ok())
            .ok_or_else(|| {
                format!("`modality` is {v}; expected text, vision, audio or a code 0–255")
            })?,
    };
    let source = match obj.remove("source") {
        None => String::new(),
        Some(Value::String(s)) => s,
        Some(v) => return Err(format!("`source` is {v}, not a string")),
    };
    let token_modality = match obj.remove("token_modality") {
        None => None,
        Some(v) => {
            let tokens = match &input {
                ProbeInput::Tokens(tokens) => tokens,
                ProbeInput::Features(_) => {
                    return Err("`token_modality` with `input` features: it needs `tokens`".into());
                }
                ProbeInput::Text(_) => {
                    return Err("`token_modality` with `text`: it needs `tokens`".into());
                }
            };
            let Value::Array(items) = v else {
                return Err(format!(
                    "`token_modality` is {v}, not an array of modalities"
                ));
            };
            if items.len() != tokens.len() {
                return Err(format!(
                    "`token_modality` has {} entries for {} tokens",
                    items.len(),
                    tokens.len()
                ));
            }
            let codes = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    modality_value(item).ok_or_else(|| {
                        format!(
                            "`token_modality[{i}]` is {item}; expected text, vision, audio or a \
                             code 0–255"
                        )
                    })
                })
                .collect::<std::result::Result<Vec<u8>, String>>()?;
            Some(codes)
        }
    };
    Ok(ProbeExample {
        input,
        modality,
        source,
        token_modality,
        meta: obj.remove("meta"),
    })
}

/// The input of a `"text"` value.
fn parse_text(value: Value) -> std::result::Result<ProbeInput, String> {
    match value {
        Value::String(s) if s.is_empty() => Err("`text` is empty".into()),
        Value::String(s) => Ok(ProbeInput::Text(s)),
        v => Err(format!("`text` is {v}, not a string")),
    }
}

/// Parses a whole probe set; `file` names it in errors. Errors are
/// [`ErrorKind::InvalidInput`] and say `line N: …` (lines count from 1).
pub fn parse_probe_set(text: &str, file: &Path) -> Result<Vec<ProbeExample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example = parse_line(line).map_err(|msg| {
            Error::new(ErrorKind::InvalidInput, format!("line {}: {msg}", i + 1)).with_file(file)
        })?;
        out.push(example);
    }
    Ok(out)
}

/// Reads the probe set `path` ([`parse_probe_set`]); a missing file is
/// [`ErrorKind::NotFound`], an unreadable one [`ErrorKind::Io`].
pub fn read_probe_set(path: &Path) -> Result<Vec<ProbeExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(ErrorKind::NotFound, "no such probe set").with_file(path)
        } else {
            Error::io(path, e)
        }
    })?;
    parse_probe_set(&text, path)
}

/// Writes `examples` to `path` as JSON Lines (atomically: a temporary
/// file renamed when complete).
pub fn write_probe_set(path: &Path, examples: &[ProbeExample]) -> Result<()> {
    write_atomically(path, |temp| {
        let file = std::fs::File::create(temp).map_err(|e| Error::io(temp, e))?;
        let mut out = std::io::BufWriter::new(file);
        for e in examples {
            writeln!(out, "{}", e.to_json_line()).map_err(|e| Error::io(temp, e))?;
        }
        out.flush().map_err(|e| Error::io(temp, e))
    })
}

/// Reads several probe sets into one list, in order; an example without a
/// `"source"` gets its file's stem (`vqa` for `data/vqa.jsonl`).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<ProbeExample>> {
    let mut out = Vec::new();
    for path in paths {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for mut e in read_probe_set(path)? {
            if e.source.is_empty() {
                e.source = stem.clone();
            }
            out.push(e);
        }
    }
    Ok(out)
}

/// How many examples to draw from each source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// The quota of sources not named in `per_source`; `None` leaves them
    /// out of the mixture.
    pub default: Option<usize>,
    /// Quotas by source name.
    pub per_source: BTreeMap<String, usize>,
}

/// A uniform index below `n` (> 0), by multiply-shift.
fn below(rng: &mut Rng, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// Draws the meta-probe mixture from `examples`: for each source (in name
/// order), exactly its quota of examples, uniformly without replacement;
/// then shuffles the whole mixture, so that keeping only the first rows
/// (the recorder's `max_examples`) still keeps a mix of sources.
///
/// Deterministic: the draw of a source depends only on `seed`, the source's
/// name and its examples in input order (a splitmix64 stream per source),
/// and the shuffle only on `seed` and the drawn list.
///
/// Errors ([`ErrorKind::InvalidInput`]): a quota larger than its source, a
/// quota for a source no example has, an empty mixture.
pub fn sample_mixture(
    examples: &[ProbeExample],
    quotas: &Quotas,
    seed: u64,
) -> Result<Vec<ProbeExample>> {
    let mut by_source: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_source.entry(e.source.as_str()).or_default().push(i);
    }
    if let Some(name) = quotas
        .per_source
        .keys()
        .find(|s| !by_source.contains_key(s.as_str()))
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "a quota for source `{name}`, but no example has that source (sources: {})",
                by_source.keys().copied().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let mut mixture = Vec::new();
    for (source, mut indices) in by_source {
        let Some(quota) = quotas.per_source.get(source).copied().or(quotas.default) else {
            continue;
        };
        if quota > indices.len() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "source `{source}` has {} examples, fewer than its quota {quota}",
                    indices.len()
                ),
            ));
        }
        let mut rng = Rng::new(seed, &format!("flatmerge probe-set source {source}"));
        for i in 0..quota {
            let j = i + below(&mut rng, indices.len() - i);
            indices.swap(i, j);
        }
        mixture.extend(indices[..quota].iter().map(|&i| examples[i].clone()));
    }
    if mixture.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the mixture is empty: give a quota to at least one source",
        ));
    }
    let mut rng = Rng::new(seed, "flatmerge probe-set mixture");
    for i in (1..mixture.len()).rev() {
        let j = below(&mut rng, i + 1);
        mixture.swap(i, j);
    }
    Ok(mixture)
}
