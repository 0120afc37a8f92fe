//! Vocabulary merging (`tokenizer_source:` / `tokenizer:`, mergekit's
//! semantics): a union of three word-level vocabularies whose tokens sit at
//! different ids, with every fill rule exercised (own row, base row, the
//! one model that has it, the mean, zeros, a configured source, `force`,
//! `kind: model_token`, padding rows), checked value by value against rows
//! assembled here from the inputs; the merged tokenizer round-trips text
//! through Hugging Face `tokenizers`; `tokenizer_source: base` maps rows by
//! token; and bad inputs are one clear error with no output left.

use flatmerge_suite::{f32_tensors, leftovers, report, tempdir, try_merge_yaml, write_f32_model};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const COLS: usize = 4;
const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
const UP: &str = "model.layers.0.mlp.up_proj.weight";

/// A word-level `tokenizer.json` (whitespace pre-tokenizer) with `vocab` at
/// ids 0.. and `added` tokens `(content, id, special)`.
fn word_level(vocab: &[&str], added: &[(&str, u32, bool)]) -> Value {
    let vocab: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = added
        .iter()
        .map(|(t, id, special)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": !special, "special": special})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Row `r` of a model's tensor `t` (0: embedding, 1: head): distinct values.
fn row_values(seed: u32, t: u32, r: usize) -> Vec<f32> {
    (0..COLS)
        .map(|c| (seed * 1000 + t * 100 + r as u32 * 10 + c as u32) as f32 / 64.0)
        .collect()
}

/// A model with one embedding and head row per token of `vocab` plus
/// `added`, its tokenizer files and config.
fn write_model(dir: &Path, seed: u32, vocab: &[&str], added: &[(&str, u32, bool)]) {
    let rows = vocab.len() + added.len();
    let table = |t: u32| -> Vec<f32> { (0..rows).flat_map(|r| row_values(seed, t, r)).collect() };
    let up: Vec<f32> = (0..3 * COLS)
        .map(|i| (seed as f32) + i as f32 / 8.0)
        .collect();
    write_f32_model(
        dir,
        &[
            (EMBED, vec![rows, COLS], table(0)),
            (HEAD, vec![rows, COLS], table(1)),
            (UP, vec![3, COLS], up),
        ],
    );
    let tokenizer = word_level(vocab, added);
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let decoder: serde_json::Map<String, Value> = added
        .iter()
        .map(|(t, id, special)| (id.to_string(), json!({"content": t, "special": special})))
        .collect();
    let config =
        json!({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.model"), b"stale slow tokenizer").unwrap();
    let model =
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": rows, "hidden_size": COLS});
    std::fs::write(dir.join("config.json"), model.to_string()).unwrap();
}

/// A merged model: name, seed, words, added tokens, linear weight.
type Member<'a> = (&'a str, u32, &'a [&'a str], &'a [(&'a str, u32, bool)], f32);

const C_VOCAB: [&str; 5] = ["<unk>", "<s>", "hello", "world", "cat"];
const A_VOCAB: [&str; 6] = ["<unk>", "<s>", "hello", "world", "cat", "fish"];
const B_VOCAB: [&str; 6] = ["<unk>", "<s>", "hello", "dog", "world", "fish"];
const B_ADDED: [(&str, u32, bool); 1] = [("<|im_start|>", 6, true)];

/// C (the base), A and B; B's words sit at other ids and it adds a special token.
fn family(dir: &Path) {
    write_model(&dir.join("C"), 1, &C_VOCAB, &[]);
    write_model(&dir.join("A"), 2, &A_VOCAB, &[]);
    write_model(&dir.join("B"), 3, &B_VOCAB, &B_ADDED);
}

const UNION: &str = "
merge_method: linear
base_model: ./C
models:
  - model: ./A
    parameters: {weight: 0.5}
  - model: ./B
    parameters: {weight: 0.3}
  - model: ./C
    parameters: {weight: 0.2}
tokenizer:
  source: union
  tokens:
    world:
      source: ./B
      force: true
    <s>:
      source: {kind: model_token, model: ./A, token: <unk>}
      force: true
    <pad>: {}
  pad_to_multiple_of: 4
dtype: float32
";

/// The id of `token` in a model's vocabulary (its words, then its added tokens).
fn id_in(vocab: &[&str], added: &[(&str, u32, bool)], token: &str) -> Option<usize> {
    vocab
        .iter()
        .position(|t| *t == token)
        .or_else(|| added.iter().find(|a| a.0 == token).map(|a| a.1 as usize))
}

#[test]
fn union_fills_every_missing_row_by_mergekit_rules_and_round_trips_text() {
    let dir = tempdir();
    family(dir.path());
    let out = dir.path().join("out");
    let summary = try_merge_yaml(dir.path(), UNION, 0, Some(2), &out).expect("merge");
    // The union: C's words, then A's and B's new ones, then B's special
    // token, then the configured `<pad>`; padded from 9 to 12 rows.
    let tokens = [
        "<unk>",
        "<s>",
        "hello",
        "world",
        "cat",
        "fish",
        "dog",
        "<|im_start|>",
        "<pad>",
    ];
    let merged = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for (id, token) in tokens.iter().enumerate() {
        assert_eq!(merged.token_to_id(token), Some(id as u32), "{token}");
    }
    assert_eq!(merged.get_vocab_size(true), tokens.len());
    let text = "<|im_start|> hello dog world fish cat";
    let ids = merged.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids, [7, 2, 6, 3, 5, 4]);
    assert_eq!(merged.decode(&ids, false).unwrap(), text);
    assert_eq!(
        merged.decode(&ids, true).unwrap(),
        "hello dog world fish cat"
    );

    let models: [Member; 3] = [
        ("A", 2, &A_VOCAB, &[], 0.5),
        ("B", 3, &B_VOCAB, &B_ADDED, 0.3),
        ("C", 1, &C_VOCAB, &[], 0.2),
    ];
    let (c, b) = (&models[2], &models[1]);
    let merged_values = f32_tensors(&out);
    for (t, name) in [(0u32, EMBED), (1, HEAD)] {
        // Each model's rows in the output's vocabulary, by the rules.
        let mapped: Vec<Vec<Vec<f32>>> = models
            .iter()
            .map(|&(_, seed, vocab, added, _)| {
                let mut rows: Vec<Vec<f32>> = tokens
                    .iter()
                    .map(|&token| match token {
                        // force: B's row for everyone
                        "world" => row_values(b.1, t, id_in(b.2, b.3, "world").unwrap()),
                        // force, model_token: A's row of <unk>
                        "<s>" => row_values(2, t, 0),
                        // configured without a source, in no model: zeros
                        "<pad>" => vec![0.0; COLS],
                        _ => match id_in(vocab, added, token) {
                            Some(own) => row_values(seed, t, own),
                            // base C has it
                            None if token == "cat" => row_values(c.1, t, 4),
                            // only B has it
                            None if token == "dog" || token == "<|im_start|>" => {
                                row_values(b.1, t, id_in(b.2, b.3, token).unwrap())
                            }
                            // A and B have it, C lacks it: their mean
                            None if token == "fish" => row_values(2, t, 5)
                                .iter()
                                .zip(row_values(3, t, 5))
                                .map(|(x, y)| ((*x as f64 + y as f64) / 2.0) as f32)
                                .collect(),
                            None => unreachable!("{token}"),
                        },
                    })
                    .collect();
                let mean: Vec<f32> = (0..COLS)
                    .map(|col| {
                        (rows.iter().map(|r| r[col] as f64).sum::<f64>() / tokens.len() as f64)
                            as f32
                    })
                    .collect();
                rows.extend(std::iter::repeat_n(mean, 3));
                rows
            })
            .collect();
        let got = &merged_values[name];
        assert_eq!(got.len(), 12 * COLS, "{name}");
        for r in 0..12 {
            for col in 0..COLS {
                let want: f32 = mapped
                    .iter()
                    .zip(&models)
                    .map(|(rows, m)| m.4 * rows[r][col])
                    .sum();
                let g = got[r * COLS + col];
                assert!(
                    (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{name} row {r} col {col}: {g} vs {want}"
                );
            }
        }
    }
    // Other tensors merge as without a vocabulary.
    assert_eq!(merged_values[UP].len(), 3 * COLS);

    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 12);
    let tokenizer_config: Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    let decoder = &tokenizer_config["added_tokens_decoder"];
    assert_eq!(decoder["7"]["content"], "<|im_start|>");
    assert_eq!(decoder["7"]["special"], true);
    assert_eq!(decoder["8"]["content"], "<pad>");
    assert!(
        !out.join("tokenizer.model").exists(),
        "a rebuilt tokenizer.json drops the stale slow tokenizer"
    );
    let section = &report(&out)["vocabulary"];
    assert_eq!(section["source"], "union");
    assert_eq!(section["tokens"], 9);
    assert_eq!(section["rows"], 12);
    assert_eq!(section["added_tokens"], 4);
    let from = &section["rows_from"];
    // <unk>, hello: every model; cat: the base; dog, <|im_start|>: one
    // model; fish: the mean; world, <s>, <pad>: configured.
    assert_eq!(
        (
            &from["every_model"],
            &from["base_model"],
            &from["single_model"],
            &from["mean"],
            &from["zero"],
            &from["configured"],
            &from["padding"]
        ),
        (
            &json!(2),
            &json!(1),
            &json!(2),
            &json!(1),
            &json!(0),
            &json!(3),
            &json!(3)
        )
    );
    assert_eq!(summary.report.results["vocabulary"], *section);
    let missing: BTreeMap<String, Value> = section["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                m["missing"].clone(),
            )
        })
        .collect();
    // C lacks fish, dog, <|im_start|>, <pad>; A: dog, <|im_start|>, <pad>; B: cat, <pad>.
    assert_eq!(missing["C"], 4);
    assert_eq!(missing["A"], 3);
    assert_eq!(missing["B"], 2);

    // Any thread count gives the same bytes.
    let again = dir.path().join("again");
    try_merge_yaml(dir.path(), UNION, 0, Some(1), &again).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

#[test]
fn base_vocabulary_maps_rows_by_token_and_is_a_no_op_when_vocabularies_agree() {
    let dir = tempdir();
    family(dir.path());
    // C2 has C's vocabulary: nothing is mapped, and the bytes
    // are those of the same merge without `tokenizer_source`.
    write_model(&dir.path().join("C2"), 5, &C_VOCAB, &[]);
    let plain = "merge_method: linear\nbase_model: ./C\nparameters: {weight: 1}\nmodels:\n  - model: ./C2\n  - model: ./C\n";
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    try_merge_yaml(dir.path(), plain, 0, None, &a).unwrap();
    try_merge_yaml(
        dir.path(),
        &format!("{plain}tokenizer_source: base\n"),
        0,
        None,
        &b,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(b.join("tokenizer.json")).unwrap(),
        std::fs::read(dir.path().join("C/tokenizer.json")).unwrap(),
        "the base's tokenizer is copied as it is"
    );
    // B into C's vocabulary: its rows follow the tokens; cat (not in B) is
    // the base's row; B's own extra tokens are gone.
    let out = dir.path().join("out");
    let yaml = "merge_method: linear\nbase_model: ./C\nparameters: {weight: 1}\nmodels:\n  - model: ./B\ntokenizer_source: base\n";
    try_merge_yaml(dir.path(), yaml, 0, None, &out).unwrap();
    let got = &f32_tensors(&out)[EMBED];
    assert_eq!(got.len(), 5 * COLS);
    // linear merges the base too: the mean of C's row and B's mapped row.
    for (r, token) in C_VOCAB.iter().enumerate() {
        let mapped = match id_in(&B_VOCAB, &B_ADDED, token) {
            Some(own) => row_values(3, 0, own),
            None => row_values(1, 0, r),
        };
        let want: Vec<f32> = row_values(1, 0, r)
            .iter()
            .zip(mapped)
            .map(|(c, b)| 0.5 * c + 0.5 * b)
            .collect();
        assert_eq!(&got[r * COLS..(r + 1) * COLS], want.as_slice(), "{token}");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 5);
    assert!(
        out.join("tokenizer.model").exists(),
        "an unchanged tokenizer keeps all its files"
    );
}

#[test]
fn a_model_as_tokenizer_source_gives_its_vocabulary() {
    let dir = tempdir();
    family(dir.path());
    let out = dir.path().join("out");
    let yaml = "merge_method: linear\nbase_model: ./C\nparameters: {weight: 1}\nmodels:\n  - model: ./C\n  - model: ./A\ntokenizer_source: ./B\n";
    try_merge_yaml(dir.path(), yaml, 0, None, &out).unwrap();
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(dir.path().join("B/tokenizer.json")).unwrap()
    );
    let got = &f32_tensors(&out)[EMBED];
    assert_eq!(got.len(), 7 * COLS);
    // dog: only in B, which is not merged: no model has it, so zeros.
    let dog = 3;
    assert!(got[dog * COLS..(dog + 1) * COLS].iter().all(|&x| x == 0.0));
    // world is at id 4 in B's vocabulary, 3 in C's and A's.
    let want: Vec<f32> = row_values(1, 0, 3)
        .iter()
        .zip(row_values(2, 0, 3))
        .map(|(c, a)| 0.5 * c + 0.5 * a)
        .collect();
    assert_eq!(&got[4 * COLS..5 * COLS], want.as_slice());
}

fn refused(dir: &Path, yaml: &str, needles: &[&str]) {
    let out = dir.join("refused");
    let e = try_merge_yaml(dir, yaml, 0, None, &out).unwrap_err();
    let text = e.to_string();
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
    assert!(!out.exists(), "{text}");
    assert!(leftovers(dir).is_empty(), "{text}");
}

#[test]
fn bad_vocabulary_settings_are_one_clear_error() {
    let dir = tempdir();
    family(dir.path());
    // A byte-level BPE tokenizer cannot join word-level ones.
    let bpe = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": {"h": 0, "i": 1, "hi": 2, "<unk>": 3, "<s>": 4, "x": 5}, "merges": ["h i"]}
    });
    write_model(&dir.path().join("D"), 4, &C_VOCAB, &[]);
    std::fs::write(dir.path().join("D/tokenizer.json"), bpe.to_string()).unwrap();
    let two = |source: &str, other: &str| {
        format!("merge_method: linear\nbase_model: ./C\nparameters: {{weight: 1}}\nmodels:\n  - model: ./C\n  - model: {other}\ntokenizer_source: {source}\n")
    };
    refused(
        dir.path(),
        &two("union", "./D"),
        &[
            "D/tokenizer.json",
            "BPE (byte-level)",
            "WordLevel",
            "spelled differently",
        ],
    );
    // union needs the base's tokenizer.json.
    std::fs::create_dir(dir.path().join("E")).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(dir.path().join("C").join(f), dir.path().join("E").join(f)).unwrap();
    }
    refused(
        dir.path(),
        "merge_method: linear\nbase_model: ./E\nparameters: {weight: 1}\nmodels:\n  - model: ./A\ntokenizer_source: union\n",
        &["E/tokenizer.json", "`union` needs"],
    );
    // Both keys.
    refused(
        dir.path(),
        &format!("{}tokenizer:\n  source: union\n", two("union", "./A")),
        &["not both"],
    );
    // A token's source that is not merged, a source model lacking it, a
    // model_token row out of range, an unknown kind.
    let tokens = |entry: &str| {
        format!("merge_method: linear\nbase_model: ./C\nparameters: {{weight: 1}}\nmodels:\n  - model: ./C\n  - model: ./A\ntokenizer:\n  source: union\n  tokens:\n    {entry}\n")
    };
    refused(
        dir.path(),
        &tokens("fish: {source: ./B}"),
        &[
            "tokenizer.tokens.\"fish\"",
            "B",
            "not one of the merged models",
        ],
    );
    refused(
        dir.path(),
        &tokens("fish: {source: ./C, force: true}"),
        &["tokenizer.tokens.\"fish\"", "has no such token"],
    );
    refused(
        dir.path(),
        &tokens("fish: {source: {kind: model_token, model: ./A, token_id: 99}}"),
        &["row 99", "6 rows"],
    );
    refused(
        dir.path(),
        &tokens("fish: {source: {kind: average}}"),
        &["unknown `kind: average`"],
    );
    refused(
        dir.path(),
        "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: ./A\ntokenizer:\n  pad_to_multiple_of: 0\n",
        &["pad_to_multiple_of", "positive whole number"],
    );
}
