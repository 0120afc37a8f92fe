//! `chat_template:` (mergekit's key): the chat template the merged model's
//! tokenizer gets. `auto` takes the template most of the input models have
//! (ties: the first in config order; none: the output keeps what it
//! copies); a built-in name (`alpaca`, `chatml`, `exaone`, `llama3`,
//! `mistral`, each written for flatmerge in the format of that name);
//! anything else is the Jinja text itself.

use std::collections::BTreeMap;
use std::path::Path;

/// The built-in templates, by name.
pub const BUILTIN: [(&str, &str); 5] = [
    ("alpaca", include_str!("chat_templates/alpaca.jinja")),
    ("chatml", include_str!("chat_templates/chatml.jinja")),
    ("exaone", include_str!("chat_templates/exaone.jinja")),
    ("llama3", include_str!("chat_templates/llama3.jinja")),
    ("mistral", include_str!("chat_templates/mistral.jinja")),
];

/// A validated `chat_template:` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// The plurality template of the input models, chosen when merging.
    Auto,
    /// A built-in template: its name and text.
    Builtin(&'static str, &'static str),
    /// Jinja text as written.
    Literal(String),
}

impl ChatTemplate {
    /// Parses a config value: `auto`, a built-in name, or Jinja text (at
    /// least 20 characters holding a `{`, as mergekit requires).
    pub fn parse(text: &str) -> Result<ChatTemplate, String> {
        if text == "auto" {
            return Ok(ChatTemplate::Auto);
        }
        if let Some((name, body)) = BUILTIN.iter().find(|(name, _)| *name == text) {
            return Ok(ChatTemplate::Builtin(name, body));
        }
        if text.chars().count() < 20 || !text.contains('{') {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "`{text}` is neither `auto`, a built-in template ({}) nor Jinja text",
                names.join(", ")
            ));
        }
        Ok(ChatTemplate::Literal(text.to_string()))
    }

    /// What the report calls it: `auto`, the built-in's name, or `literal`.
    pub fn label(&self) -> &str {
        match self {
            ChatTemplate::Auto => "auto",
            ChatTemplate::Builtin(name, _) => name,
            ChatTemplate::Literal(_) => "literal",
        }
    }

    /// The template text, reading the model directories `dirs` (in config
    /// order) for `auto`; `None` when `auto` finds no model with one.
    pub fn resolve<'a>(&self, dirs: impl IntoIterator<Item = &'a Path>) -> Option<String> {
        match self {
            ChatTemplate::Builtin(_, body) => Some(body.to_string()),
            ChatTemplate::Literal(text) => Some(text.clone()),
            ChatTemplate::Auto => {
                let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
                for (order, template) in dirs.into_iter().filter_map(model_template).enumerate() {
                    counts.entry(template).or_insert((0, order)).0 += 1;
                }
                counts
                    .into_iter()
                    .max_by(|(_, (n, first)), (_, (m, other))| n.cmp(m).then(other.cmp(first)))
                    .map(|(template, _)| template)
            }
        }
    }
}

/// A model directory's chat template, trimmed: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or the `default`
/// entry of a list of named templates).
pub fn model_template(dir: &Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(text.trim().to_string()).filter(|t| !t.is_empty());
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).ok()?).ok()?;
    let template = match config.get("chat_template")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))?
            .get("template")?
            .as_str()?
            .to_string(),
        _ => return None,
    };
    Some(template.trim().to_string()).filter(|t| !t.is_empty())
}
