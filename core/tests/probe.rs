//! Native probes: the MLP probe's statistics against a forward pass
//! computed by hand, MLP model directories (write, read, errors), the
//! probe-set format (round trip, line-numbered errors) and the meta-probe
//! sampler (quotas, determinism).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use flatmerge::demo::Rng;
use flatmerge::dtype::Dtype;
use flatmerge::probe::mlp::{Activation, Linear, Mlp, MlpLayerSpec, MlpSpec, DESCRIPTION_FILE};
use flatmerge::probe::set::{
    parse_probe_set, read_probe_set, read_sources, sample_mixture, write_probe_set, Quotas,
};
use flatmerge::probe::{
    open_model, probe_files, run_probe, ProbeExample, ProbeInput, ProbeOptions, ProbeProgress,
};
use flatmerge::recorder::{Recorder, RecorderOptions};
use flatmerge::stats::ActivationStats;
use flatmerge::ErrorKind;

/// Multiples of 1/8 in [-2, 2]: products and short sums are exact in f32
/// and f64, so hand computation and probe agree bit for bit.
fn dyadic(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() % 33) as f32 - 16.0) / 8.0)
        .collect()
}

/// fc1: 3 → 4 with bias, relu; fc2: 4 → 2 without bias, identity.
fn tiny_mlp() -> Mlp {
    let mut rng = Rng::new(1, "tiny mlp");
    let mut fc2 = MlpLayerSpec::new("fc2", 4, 2, Activation::None);
    fc2.bias = false;
    let spec = MlpSpec {
        layers: vec![MlpLayerSpec::new("fc1", 3, 4, Activation::Relu), fc2],
    };
    let layers = vec![
        Linear {
            weight: dyadic(&mut rng, 12),
            bias: Some(dyadic(&mut rng, 4)),
        },
        Linear {
            weight: dyadic(&mut rng, 8),
            bias: None,
        },
    ];
    Mlp::new(spec, layers).unwrap()
}

fn examples(n: usize, width: usize, seed: u64) -> Vec<ProbeExample> {
    let mut rng = Rng::new(seed, "inputs");
    (0..n)
        .map(|i| ProbeExample {
            modality: (i % 2) as u8,
            source: format!("task{}", i % 3),
            ..ProbeExample::features(dyadic(&mut rng, width))
        })
        .collect()
}

/// `W x + b` by hand, `W` row-major `[out, in]`.
fn affine(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .enumerate()
        .map(|(o, row)| {
            let mut s = b.map_or(0.0, |b| b[o] as f64);
            for (wi, xi) in row.iter().zip(x) {
                s += *wi as f64 * *xi as f64;
            }
            s as f32
        })
        .collect()
}

fn mean_rows(rows: &[Vec<f32>]) -> Vec<f32> {
    let n = rows.len() as f64;
    (0..rows[0].len())
        .map(|j| (rows.iter().map(|r| r[j] as f64).sum::<f64>() / n) as f32)
        .collect()
}

fn input(e: &ProbeExample) -> &[f32] {
    match &e.input {
        ProbeInput::Features(x) => x,
        _ => panic!("features expected"),
    }
}

#[test]
fn mlp_probe_statistics_equal_a_forward_pass_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = tiny_mlp();
    let model_dir = dir.path().join("mlp");
    mlp.save(&model_dir).unwrap();
    let probe_set = dir.path().join("probe.jsonl");
    let set = examples(8, 3, 2);
    write_probe_set(&probe_set, &set).unwrap();
    let out = dir.path().join("mlp.stats.safetensors");
    let summary = probe_files(&model_dir, &probe_set, &out, &ProbeOptions::default()).unwrap();
    assert_eq!((summary.examples, summary.rows, summary.layers), (8, 8, 2));
    assert_eq!(summary.tokens, 8, "one token per example of features");
    assert!(summary.seconds >= 0.0);
    let stats = ActivationStats::load(&out).unwrap();

    // By hand: x1 = input, y1 = W1 x1 + b1, x2 = relu(y1), y2 = W2 x2.
    let (l1, l2) = (&mlp.layers()[0], &mlp.layers()[1]);
    let (mut x1, mut y1, mut x2, mut y2) = (vec![], vec![], vec![], vec![]);
    for e in &set {
        let x = input(e).to_vec();
        let y = affine(&l1.weight, l1.bias.as_deref(), &x);
        let h: Vec<f32> = y.iter().map(|v| v.max(0.0)).collect();
        let z = affine(&l2.weight, None, &h);
        x1.push(x);
        y1.push(y);
        x2.push(h);
        y2.push(z);
    }
    for (name, xs, ys) in [("fc1", &x1, &y1), ("fc2", &x2, &y2)] {
        let s = stats.layer(name).unwrap();
        assert_eq!(s.count, Some(8), "{name}");
        assert_eq!(s.x_mean.as_ref().unwrap(), &mean_rows(xs), "{name}");
        assert_eq!(s.y_mean.as_ref().unwrap(), &mean_rows(ys), "{name}");
        let (xr, yr) = (s.x_rows.as_ref().unwrap(), s.y_rows.as_ref().unwrap());
        for n in 0..8 {
            assert_eq!(xr.row(n), &xs[n][..], "{name} row {n}");
            assert_eq!(yr.row(n), &ys[n][..], "{name} row {n}");
        }
    }
    assert_eq!(
        stats.modality.as_deref(),
        Some(&[0u8, 1, 0, 1, 0, 1, 0, 1][..])
    );
    assert_eq!(stats.examples, 8);
    assert!(stats.model.contains("MLP 3 → 4 → 2"), "{}", stats.model);
    assert!(stats.probe.contains("8 examples"), "{}", stats.probe);
    // The forward functions agree with the hand computation too.
    assert_eq!(mlp.forward(input(&set[3])), y2[3]);
    let batch: Vec<f32> = set.iter().flat_map(|e| input(e).to_vec()).collect();
    assert_eq!(mlp.forward_batch(&batch, 8), y2.concat());
}

#[test]
fn probe_statistics_do_not_depend_on_threads_and_max_examples_caps_rows() {
    let mut rng = Rng::new(3, "wide");
    let spec = MlpSpec::chain(&[16, 32, 32, 5], Activation::Gelu, Activation::None);
    let layers = spec
        .layers
        .iter()
        .map(|l| Linear {
            weight: rng.normals(l.in_features * l.out_features, 0.3),
            bias: Some(rng.normals(l.out_features, 0.1)),
        })
        .collect();
    let mlp = Mlp::new(spec, layers).unwrap();
    let set: Vec<ProbeExample> = (0..40)
        .map(|_| ProbeExample::features(rng.normals(16, 1.0)))
        .collect();
    let run = |threads: usize, max_examples: usize| {
        let r = Recorder::new(RecorderOptions {
            max_examples,
            ..RecorderOptions::default()
        });
        run_probe(&mlp, &set, &r, Some(threads)).unwrap();
        r.stats().unwrap()
    };
    let one = run(1, 40);
    assert_eq!(one, run(4, 40));
    assert_eq!(one.layers.len(), 3);
    let capped = run(3, 10);
    assert_eq!(capped.examples, 10);
    for (name, l) in &capped.layers {
        assert_eq!(l.x_mean, one.layers[name].x_mean);
        let rows = l.x_rows.as_ref().unwrap();
        assert_eq!(
            rows.data[..],
            one.layers[name].x_rows.as_ref().unwrap().data[..rows.data.len()]
        );
    }
}

#[test]
fn the_progress_callback_sees_every_example_once() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("mlp");
    tiny_mlp().save(&model_dir).unwrap();
    let probe_set = dir.path().join("probe.jsonl");
    write_probe_set(&probe_set, &examples(23, 3, 9)).unwrap();
    let out = dir.path().join("mlp.stats.safetensors");
    let calls = Arc::new(Mutex::new(Vec::<ProbeProgress>::new()));
    let sink = calls.clone();
    let options = ProbeOptions {
        threads: Some(3),
        progress: Some(Arc::new(move |p: ProbeProgress| {
            sink.lock().unwrap().push(p)
        })),
        ..ProbeOptions::default()
    };
    let summary = probe_files(&model_dir, &probe_set, &out, &options).unwrap();
    assert_eq!(summary.tokens, 23);
    let mut calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 23);
    assert!(calls.iter().all(|p| p.examples_total == 23));
    calls.sort_by_key(|p| p.examples_done);
    let done: Vec<usize> = calls.iter().map(|p| p.examples_done).collect();
    assert_eq!(done, (1..=23).collect::<Vec<_>>());
    assert_eq!(calls.iter().map(|p| p.tokens_done).max(), Some(23));
}

#[test]
fn mlp_directories_round_trip_in_every_float_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = tiny_mlp();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let d = dir.path().join(dtype.as_str());
        mlp.save_as(&d, dtype).unwrap();
        // Dyadic values in [-2, 2] are exact in every dtype.
        assert_eq!(Mlp::load(&d).unwrap(), mlp, "{dtype}");
        let model = open_model(&d).unwrap();
        assert_eq!(model.layers().len(), 2);
        assert_eq!(model.layers()[1].name, "fc2");
    }
    assert!(mlp.save_as(&dir.path().join("i64"), Dtype::I64).is_err());
}

#[test]
fn activations_have_their_textbook_values() {
    let close = |a: f32, b: f32| assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    close(Activation::Gelu.apply(1.0), 0.841_344_7);
    close(Activation::GeluTanh.apply(1.0), 0.841_192);
    close(Activation::Silu.apply(1.0), 0.731_058_6);
    close(Activation::Sigmoid.apply(0.0), 0.5);
    close(Activation::Tanh.apply(0.5), 0.462_117_2);
    assert_eq!(Activation::Relu.apply(-3.0), 0.0);
    assert_eq!(Activation::None.apply(-3.0), -3.0);
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn bad_mlp_directories_are_refused_with_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("m");
    tiny_mlp().save(&d).unwrap();
    let desc = d.join(DESCRIPTION_FILE);
    let original = std::fs::read_to_string(&desc).unwrap();

    // Layers that do not chain.
    write(
        &desc,
        &original.replacen("\"in_features\": 4", "\"in_features\": 5", 1),
    );
    let e = open_model(&d).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Format);
    assert_eq!(e.tensor(), Some("fc2"));
    assert!(e.message().contains("differs from `fc1`"), "{e}");
    assert_eq!(e.file(), Some(desc.as_path()));

    // A bias the description does not have.
    write(
        &desc,
        &original.replacen("\"bias\": true", "\"bias\": false", 1),
    );
    let e = Mlp::load(&d).unwrap_err();
    assert_eq!(e.tensor(), Some("fc1.bias"), "{e}");

    // A shape that differs from the description.
    write(
        &desc,
        &original
            .replacen("\"out_features\": 4", "\"out_features\": 5", 1)
            .replacen("\"in_features\": 4", "\"in_features\": 5", 1),
    );
    let e = Mlp::load(&d).unwrap_err();
    assert_eq!(e.tensor(), Some("fc1.weight"), "{e}");
    assert!(e.message().contains("[4, 3]"), "{e}");

    // An unknown activation, an unknown key.
    write(&desc, &original.replacen("\"relu\"", "\"swishy\"", 1));
    let e = Mlp::load(&d).unwrap_err();
    assert!(e.message().contains("swishy"), "{e}");
    write(&desc, &original.replacen("\"bias\"", "\"biass\"", 1));
    assert!(Mlp::load(&d).unwrap_err().message().contains("biass"));

    // No description: not a model flatmerge can run; LLaMA: not yet.
    std::fs::remove_file(&desc).unwrap();
    let e = open_model(&d).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains(DESCRIPTION_FILE), "{e}");
    write(&d.join("config.json"), r#"{"model_type": "llama"}"#);
    let e = open_model(&d).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("model_type `llama`"), "{e}");
}

#[test]
fn examples_that_do_not_fit_the_model_are_refused_before_running() {
    let mlp = tiny_mlp();
    let mut set = examples(4, 3, 4);
    set[2].input = ProbeInput::Features(vec![1.0; 5]);
    let r = Recorder::new(RecorderOptions::default());
    let e = run_probe(&mlp, &set, &r, Some(2)).unwrap_err();
    assert!(
        e.message().contains("example 2 has 5 input features"),
        "{e}"
    );
    set[2].input = ProbeInput::Tokens(vec![1, 2]);
    let e = run_probe(&mlp, &set, &r, Some(2)).unwrap_err();
    assert!(e.message().contains("example 2 has `tokens`"), "{e}");
    assert!(r.stats().unwrap().layers.is_empty(), "nothing ran");
}

#[test]
fn probe_sets_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("set.jsonl");
    let mut set = examples(3, 4, 5);
    set[0].input = ProbeInput::Features(vec![0.1, -1e-7, 3.5e30, 1.0 / 3.0]);
    set[1].input = ProbeInput::Tokens(vec![0, 17, u32::MAX]);
    set[1].modality = 7;
    set[1].token_modality = Some(vec![1, 0, 200]);
    set[2].meta = Some(serde_json::json!({"id": "q-17", "n": [1, 2]}));
    set[2].source.clear();
    write_probe_set(&path, &set).unwrap();
    assert_eq!(read_probe_set(&path).unwrap(), set);
    assert!(
        set[1]
            .to_json_line()
            .contains(r#""token_modality":["vision","text",200]"#),
        "{}",
        set[1].to_json_line()
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.lines().next().unwrap().starts_with("{\"input\":[0.1,"),
        "{text}"
    );
}

#[test]
fn probe_set_errors_carry_line_numbers() {
    let file = Path::new("probe.jsonl");
    let good = r#"{"input": [1, 2], "modality": "vision", "source": "vqa"}"#;
    let cases: &[(&str, &str)] = &[
        ("{\"input\": [1, 2]", "column"),
        ("[1, 2]", "a JSON object"),
        (r#"{"inputs": [1]}"#, "unknown key `inputs`"),
        (
            r#"{"input": [1], "tokens": [1]}"#,
            "both `input` and `tokens`",
        ),
        (r#"{"source": "x"}"#, "no `input`"),
        (r#"{"input": []}"#, "`input` is empty"),
        (r#"{"input": [1, "a"]}"#, "`input[1]`"),
        (r#"{"input": [1e39]}"#, "not a finite f32"),
        (r#"{"tokens": [1, -2]}"#, "`tokens[1]`"),
        (r#"{"tokens": [4294967296]}"#, "`tokens[0]`"),
        (
            r#"{"input": [1], "modality": "smell"}"#,
            "unknown modality `smell`",
        ),
        (r#"{"input": [1], "modality": 256}"#, "`modality` is 256"),
        (r#"{"input": [1], "source": 3}"#, "`source` is 3"),
        (
            r#"{"input": [1], "token_modality": ["text"]}"#,
            "`token_modality` with `input` features",
        ),
        (
            r#"{"tokens": [1, 2], "token_modality": ["text"]}"#,
            "`token_modality` has 1 entries for 2 tokens",
        ),
        (
            r#"{"tokens": [1, 2], "token_modality": "text"}"#,
            "not an array of modalities",
        ),
        (
            r#"{"tokens": [1, 2], "token_modality": [0, "smell"]}"#,
            "`token_modality[1]`",
        ),
        (
            r#"{"tokens": [1, 2], "token_modality": [256, 0]}"#,
            "`token_modality[0]` is 256",
        ),
    ];
    for (bad, needle) in cases {
        // Line 4: two good lines and a blank one come first.
        let text = format!("{good}\n{good}\n\n{bad}\n{good}\n");
        let e = parse_probe_set(&text, file).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(e.file(), Some(file));
        assert!(e.message().starts_with("line 4: "), "{bad}: {e}");
        assert!(e.message().contains(needle), "{bad}: {e}");
    }
    let set = parse_probe_set(&format!("{good}\n  \n{good}"), file).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set[0].token_modality, None);
    let keyed = r#"{"tokens": [5, 6, 7], "token_modality": ["vision", 0, 9]}"#;
    let keyed = parse_probe_set(keyed, file).unwrap();
    assert_eq!(keyed[0].token_modality, Some(vec![1, 0, 9]));
    assert_eq!((set[0].modality, set[0].source.as_str()), (1, "vqa"));
    let e = read_probe_set(&std::env::temp_dir().join("no-such-flatmerge-probe.jsonl"));
    assert_eq!(e.unwrap_err().kind(), ErrorKind::NotFound);
}

fn counts(set: &[ProbeExample]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in set {
        *out.entry(e.source.clone()).or_default() += 1;
    }
    out
}

#[test]
fn the_sampler_respects_quotas_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, n) in [("vqa", 30), ("sqa", 20), ("caption", 10)] {
        let set: Vec<ProbeExample> = (0..n)
            .map(|i| ProbeExample {
                meta: Some(serde_json::json!(i)),
                ..ProbeExample::features(vec![i as f32])
            })
            .collect();
        let path = dir.path().join(format!("{name}.jsonl"));
        write_probe_set(&path, &set).unwrap();
        paths.push(path);
    }
    let all = read_sources(&paths).unwrap();
    assert_eq!(all.len(), 60);
    assert_eq!(all[0].source, "vqa", "the file stem is the default source");

    let quotas = Quotas {
        default: Some(8),
        per_source: BTreeMap::from([("caption".to_string(), 5), ("sqa".to_string(), 0)]),
    };
    let a = sample_mixture(&all, &quotas, 42).unwrap();
    assert_eq!(
        counts(&a),
        BTreeMap::from([("caption".to_string(), 5), ("vqa".to_string(), 8)])
    );
    // Without replacement: no example twice.
    let mut ids: Vec<String> = a
        .iter()
        .map(|e| format!("{}{}", e.source, e.meta.as_ref().unwrap()))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 13);
    // The same seed, the same mixture; another seed, another.
    assert_eq!(sample_mixture(&all, &quotas, 42).unwrap(), a);
    let b = sample_mixture(&all, &quotas, 43).unwrap();
    assert_ne!(b, a);
    assert_eq!(counts(&b), counts(&a));
    // The mixture is shuffled, not grouped by source.
    assert!(a.windows(2).any(|w| w[0].source != w[1].source));

    // A quota larger than its source, a source nobody has, nothing at all.
    let too_many = Quotas {
        default: None,
        per_source: BTreeMap::from([("caption".to_string(), 11)]),
    };
    let e = sample_mixture(&all, &too_many, 1).unwrap_err();
    assert!(
        e.message()
            .contains("`caption` has 10 examples, fewer than its quota 11"),
        "{e}"
    );
    let unknown = Quotas {
        default: None,
        per_source: BTreeMap::from([("ocr".to_string(), 1)]),
    };
    let e = sample_mixture(&all, &unknown, 1).unwrap_err();
    assert!(e.message().contains("source `ocr`"), "{e}");
    assert!(sample_mixture(&all, &Quotas::default(), 1).is_err());
}

/// A word-level tokenizer.json (whitespace pre-tokenizer, a BOS added by
/// a template post-processor) for a vocabulary of 64.
const TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
  },
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"<unk>": 0, "<s>": 1, "hello": 5, "world": 17, "cat": 63, "!": 9},
    "unk_token": "<unk>"
  }
}"#;

#[test]
fn text_examples_are_tokenized_with_the_model_tokenizer() {
    use flatmerge::probe::llama::{write_random_model, LlamaConfig, RandomModel, TOKENIZER_FILE};

    let dir = tempfile::tempdir().unwrap();
    let file = Path::new("p.jsonl");
    // Parsing and writing back.
    let set = parse_probe_set(r#"{"text": "hello world!", "source": "chat"}"#, file).unwrap();
    assert_eq!(set[0].input, ProbeInput::Text("hello world!".into()));
    assert_eq!(parse_probe_set(&set[0].to_json_line(), file).unwrap(), set);
    for (bad, needle) in [
        (r#"{"text": ""}"#, "`text` is empty"),
        (r#"{"text": 3}"#, "`text` is 3"),
        (
            r#"{"text": "a", "tokens": [1]}"#,
            "both `tokens` and `text`",
        ),
        (
            r#"{"text": "a", "token_modality": [0]}"#,
            "`token_modality` with `text`",
        ),
    ] {
        let e = parse_probe_set(bad, file).unwrap_err();
        assert!(e.message().contains(needle), "{bad}: {e}");
    }

    // A LLaMA model with a tokenizer.json: the text runs as its token ids.
    let mut config = LlamaConfig::new(64, 32, 48, 2, 4, 2);
    config.rms_norm_eps = 1e-5;
    let model_dir = dir.path().join("llama");
    let random = RandomModel {
        config,
        dtype: Dtype::F32,
        multiway: 0,
        seed: 7,
    };
    write_random_model(&model_dir, &random).unwrap();
    let text_set = dir.path().join("text.jsonl");
    std::fs::write(
        &text_set,
        "{\"text\": \"hello world!\"}\n{\"text\": \"cat zebra hello\"}\n",
    )
    .unwrap();
    let tokens_set = dir.path().join("tokens.jsonl");
    std::fs::write(
        &tokens_set,
        "{\"tokens\": [1, 5, 17, 9]}\n{\"tokens\": [1, 63, 0, 5]}\n",
    )
    .unwrap();
    let out = |name: &str| dir.path().join(name);

    // No tokenizer.json yet: the error names it.
    let e = probe_files(
        &model_dir,
        &text_set,
        &out("a.safetensors"),
        &ProbeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.file(), Some(model_dir.join(TOKENIZER_FILE).as_path()));
    assert!(e.message().contains("example 0: "), "{e}");

    std::fs::write(model_dir.join(TOKENIZER_FILE), TOKENIZER_JSON).unwrap();
    let from_text = probe_files(
        &model_dir,
        &text_set,
        &out("text.safetensors"),
        &ProbeOptions::default(),
    )
    .unwrap();
    let from_tokens = probe_files(
        &model_dir,
        &tokens_set,
        &out("tokens.safetensors"),
        &ProbeOptions::default(),
    )
    .unwrap();
    assert_eq!((from_text.tokens, from_tokens.tokens), (8, 8));
    let a = ActivationStats::load(&out("text.safetensors")).unwrap();
    let b = ActivationStats::load(&out("tokens.safetensors")).unwrap();
    assert!(!a.layers.is_empty());
    assert_eq!(a.layers, b.layers);

    // An MLP takes no text.
    let mlp_dir = dir.path().join("mlp");
    tiny_mlp().save(&mlp_dir).unwrap();
    let e = probe_files(
        &mlp_dir,
        &text_set,
        &out("mlp.safetensors"),
        &ProbeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("need a tokenizer"), "{e}");
}
