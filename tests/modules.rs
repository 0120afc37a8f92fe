//! `modules:` (mergekit's multi-module configs, for multimodal models) end
//! to end on generated checkpoints in llava-hf's and Qwen2-VL's layouts:
//! each module merged from its own `models:` or `slices:`, the vision
//! tower's stack renumbered (`…layers.N.` and Qwen2-VL's `visual.blocks.N.`),
//! each module's layer count set in `config.json`, gradients interpolated
//! over a module's own layers, parameter precedence (source → slice →
//! module → global), the text-only form equal to `slices:` byte for byte,
//! and bad configs refused naming the key with nothing written.

use flatmerge::config::MergeConfig;
use flatmerge::engine::{MergeOptions, PreparedMerge};
use flatmerge_suite::{assert_refused, f32_tensors, options, report, tempdir, write_f32_model};
use std::collections::BTreeMap;
use std::path::Path;

const HIDDEN: usize = 4;
const VISION: usize = 3;

/// Which checkpoint layout a test model follows.
#[derive(Clone, Copy)]
enum Layout {
    /// transformers 5.25's `LlavaForConditionalGeneration`.
    LlavaHf,
    /// `Qwen2VLForConditionalGeneration` (vision blocks, `visual.merger`).
    Qwen2Vl,
}

/// The tensors of a model with `text` language and `vision` vision
/// layers (`None`: a language model alone).
fn tensors(layout: Layout, text: usize, vision: Option<usize>) -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let (lm, tower, stack, projector) = match layout {
        Layout::LlavaHf => (
            "model.language_model.",
            "model.vision_tower.vision_model.",
            "model.vision_tower.vision_model.encoder.layers.",
            vec![
                "model.multi_modal_projector.linear_1",
                "model.multi_modal_projector.linear_2",
            ],
        ),
        Layout::Qwen2Vl => (
            "model.",
            "visual.",
            "visual.blocks.",
            vec!["visual.merger.mlp.0", "visual.merger.mlp.2"],
        ),
    };
    t.push((format!("{lm}embed_tokens.weight"), vec![6, HIDDEN]));
    for l in 0..text {
        t.push((
            format!("{lm}layers.{l}.self_attn.q_proj.weight"),
            vec![HIDDEN, HIDDEN],
        ));
        t.push((
            format!("{lm}layers.{l}.mlp.up_proj.weight"),
            vec![2 * HIDDEN, HIDDEN],
        ));
        t.push((
            format!("{lm}layers.{l}.input_layernorm.weight"),
            vec![HIDDEN],
        ));
    }
    t.push((format!("{lm}norm.weight"), vec![HIDDEN]));
    t.push(("lm_head.weight".into(), vec![6, HIDDEN]));
    let Some(vision) = vision else {
        return t;
    };
    t.push((format!("{tower}patch_embed.weight"), vec![VISION, 2]));
    for l in 0..vision {
        t.push((
            format!("{stack}{l}.mlp.fc1.weight"),
            vec![2 * VISION, VISION],
        ));
        t.push((format!("{stack}{l}.layer_norm1.weight"), vec![VISION]));
    }
    if matches!(layout, Layout::LlavaHf) {
        t.push((format!("{tower}post_layernorm.weight"), vec![VISION]));
    }
    for p in projector {
        t.push((format!("{p}.weight"), vec![HIDDEN, VISION]));
        t.push((format!("{p}.bias"), vec![HIDDEN]));
    }
    t
}

/// Model `m`, each value telling model, tensor and element apart.
fn write_model(
    dir: &Path,
    name: &str,
    layout: Layout,
    m: usize,
    text: usize,
    vision: Option<usize>,
) {
    let list = tensors(layout, text, vision);
    let values: Vec<(&str, Vec<usize>, Vec<f32>)> = list
        .iter()
        .enumerate()
        .map(|(t, (n, shape))| {
            let count: usize = shape.iter().product();
            let v = (0..count)
                .map(|i| (m * 1000 + t * 10) as f32 + i as f32 / 64.0)
                .collect();
            (n.as_str(), shape.clone(), v)
        })
        .collect();
    let model_dir = dir.join(name);
    write_f32_model(&model_dir, &values);
    let vision = vision.unwrap_or(0);
    let config = match layout {
        Layout::LlavaHf => format!(
            "{{\"architectures\": [\"LlavaForConditionalGeneration\"], \"text_config\": {{\"num_hidden_layers\": {text}, \"hidden_size\": {HIDDEN}}}, \"vision_config\": {{\"num_hidden_layers\": {vision}}}}}"
        ),
        Layout::Qwen2Vl => format!(
            "{{\"architectures\": [\"Qwen2VLForConditionalGeneration\"], \"num_hidden_layers\": {text}, \"vision_config\": {{\"depth\": {vision}}}}}"
        ),
    };
    std::fs::write(model_dir.join("config.json"), config).unwrap();
}

/// Merges `yaml` into `dir/merged` as the CLI does (with a model card).
fn run(dir: &Path, yaml: &str) -> BTreeMap<String, Vec<f32>> {
    let path = dir.join("merge.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = MergeConfig::from_file(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let out = dir.join("merged");
    let _ = std::fs::remove_dir_all(&out);
    let options = MergeOptions {
        model_card: true,
        ..options(&out, Some(2), None)
    };
    PreparedMerge::new(config)
        .and_then(|p| p.run(&options))
        .unwrap_or_else(|e| panic!("merge: {e}"));
    f32_tensors(&out)
}

fn out_config(dir: &Path) -> serde_json::Value {
    let text = std::fs::read(dir.join("merged/config.json")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

#[test]
fn each_module_merges_from_its_own_models_or_slices() {
    let dir = tempdir();
    write_model(dir.path(), "A", Layout::LlavaHf, 1, 3, Some(2));
    write_model(dir.path(), "B", Layout::LlavaHf, 2, 3, Some(2));
    let out = run(
        dir.path(),
        "merge_method: linear
dtype: float32
parameters:
  weight: 1.0
modules:
  text_decoder:
    slices:
      - sources:
          - model: ./A
            layer_range: [0, 2]
      - sources:
          - model: ./B
            layer_range: [1, 3]
  vision_tower:
    models:
      - model: ./A
        parameters:
          weight: 3.0
      - model: ./B
  multi_modal_projector:
    models:
      - model: ./B
",
    );
    let a = f32_tensors(&dir.path().join("A"));
    let b = f32_tensors(&dir.path().join("B"));
    let lm = "model.language_model.";
    // Language model: A's layers 0–1, then B's 1–2 as 2–3; embeddings from
    // the first slice, the final norm and head from the last.
    for (out_layer, (from, layer)) in [(&a, 0), (&a, 1), (&b, 1), (&b, 2)].into_iter().enumerate() {
        for suffix in [
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ] {
            assert_eq!(
                out[&format!("{lm}layers.{out_layer}.{suffix}")],
                from[&format!("{lm}layers.{layer}.{suffix}")],
                "output layer {out_layer}"
            );
        }
    }
    assert_eq!(
        out[&format!("{lm}embed_tokens.weight")],
        a[&format!("{lm}embed_tokens.weight")]
    );
    assert_eq!(
        out[&format!("{lm}norm.weight")],
        b[&format!("{lm}norm.weight")]
    );
    assert_eq!(out["lm_head.weight"], b["lm_head.weight"]);
    // Vision tower: every tensor, (3·A + B) / 4; projector: B's.
    let mut vision = 0;
    for (name, got) in &out {
        if name.starts_with("model.vision_tower.") {
            vision += 1;
            for (i, g) in got.iter().enumerate() {
                let want = (3.0 * a[name][i] as f64 + b[name][i] as f64) / 4.0;
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name}[{i}]"
                );
            }
        } else if name.starts_with("model.multi_modal_projector.") {
            assert_eq!(got, &b[name], "{name}");
        }
    }
    assert_eq!(vision, 1 + 2 * 2 + 1, "every vision tensor is written");
    assert_eq!(out.len(), 3 + 4 * 3 + vision + 4);
    let config = out_config(dir.path());
    assert_eq!(config["text_config"]["num_hidden_layers"], 4);
    assert_eq!(
        config["vision_config"]["num_hidden_layers"], 2,
        "merged whole: unchanged"
    );
    let r = report(&dir.path().join("merged"));
    let inputs = r["inputs"].as_array().unwrap();
    let of = |module: &str| inputs.iter().filter(|i| i["module"] == module).count();
    assert_eq!(
        (
            of("text_decoder"),
            of("vision_tower"),
            of("multi_modal_projector")
        ),
        (2, 2, 1)
    );
    let tower = inputs
        .iter()
        .find(|i| i["module"] == "vision_tower")
        .unwrap();
    assert_eq!(tower["layer_range"], serde_json::json!([0, 2]));
    assert!(tower.get("slice").is_none(), "a whole module is no slice");
    let card = std::fs::read_to_string(dir.path().join("merged/README.md")).unwrap();
    assert!(
        card.contains("(text_decoder slice 1: layers 1–2)"),
        "{card}"
    );
    assert!(card.contains("(vision_tower)"), "{card}");
}

#[test]
fn a_vision_tower_of_blocks_is_sliced_and_gradients_run_over_its_own_layers() {
    let dir = tempdir();
    write_model(dir.path(), "A", Layout::Qwen2Vl, 1, 2, Some(3));
    write_model(dir.path(), "B", Layout::Qwen2Vl, 2, 2, Some(3));
    let out = run(
        dir.path(),
        "merge_method: slerp
base_model: ./A
dtype: float32
parameters:
  t: 0.0
modules:
  text_decoder:
    models:
      - model: ./A
      - model: ./B
  vision_tower:
    parameters:
      t: [0, 1]
    slices:
      - sources:
          - model: ./A
            layer_range: [0, 3]
          - model: ./B
            layer_range: [0, 3]
      - sources:
          - model: ./A
            layer_range: [2, 3]
          - model: ./B
            layer_range: [2, 3]
        parameters:
          t: 1.0
  multi_modal_projector:
    parameters:
      t: 1.0
    models:
      - model: ./A
      - model: ./B
",
    );
    let a = f32_tensors(&dir.path().join("A"));
    let b = f32_tensors(&dir.path().join("B"));
    // Global t = 0: the language model is A's.
    for (name, got) in out.iter().filter(|(n, _)| !n.starts_with("visual.")) {
        assert_eq!(got, &a[name], "{name}");
    }
    let fc1 = |l: usize| format!("visual.blocks.{l}.mlp.fc1.weight");
    // The module's gradient [0, 1] over the first slice's three blocks.
    assert_eq!(out[&fc1(0)], a[&fc1(0)], "t = 0 at the slice's first block");
    assert_eq!(out[&fc1(2)], b[&fc1(2)], "t = 1 at its last");
    assert!(
        out[&fc1(1)] != a[&fc1(1)] && out[&fc1(1)] != b[&fc1(1)],
        "t = 0.5 between"
    );
    // The second slice's own t = 1: B's block 2 again, as block 3.
    assert_eq!(out[&fc1(3)], b[&fc1(2)]);
    assert_eq!(
        out["visual.patch_embed.weight"], a["visual.patch_embed.weight"],
        "t = 0 outside the stack"
    );
    // The projector's own t = 1.
    for name in out.keys().filter(|n| n.starts_with("visual.merger.")) {
        assert_eq!(out[name], b[name], "{name}");
    }
    let config = out_config(dir.path());
    assert_eq!(config["vision_config"]["depth"], 4);
    assert_eq!(config["num_hidden_layers"], 2);
}

#[test]
fn a_text_only_modules_config_equals_its_plain_form_byte_for_byte() {
    let dir = tempdir();
    write_model(dir.path(), "A", Layout::LlavaHf, 1, 3, None);
    write_model(dir.path(), "B", Layout::LlavaHf, 2, 3, None);
    let bytes = |yaml: &str| {
        run(dir.path(), yaml);
        std::fs::read(dir.path().join("merged/model.safetensors")).unwrap()
    };
    let head = "merge_method: linear\ndtype: float32\nparameters:\n  weight:\n    - filter: mlp\n      value: [1, 0]\n    - value: 1\n";
    let models = "  - model: ./A\n  - model: ./B\n    parameters:\n      weight: 0.5\n";
    let indented = |text: &str| -> String { text.lines().map(|l| format!("    {l}\n")).collect() };
    assert_eq!(
        bytes(&format!("{head}models:\n{models}")),
        bytes(&format!(
            "{head}modules:\n  text_decoder:\n    models:\n{}",
            indented(models)
        )),
        "a module's `models:` is the plain merge, its gradient over the same layers"
    );
    let slices = "  - sources:\n      - model: ./A\n        layer_range: [0, 2]\n  - sources:\n      - model: ./B\n        layer_range: [0, 3]\n";
    assert_eq!(
        bytes(&format!("{head}slices:\n{slices}")),
        bytes(&format!(
            "{head}modules:\n  text_decoder:\n    slices:\n{}",
            indented(slices)
        )),
    );
}

#[test]
fn bad_modules_are_one_clear_error_and_leave_nothing() {
    let dir = tempdir();
    write_model(dir.path(), "A", Layout::LlavaHf, 1, 3, Some(2));
    write_model(dir.path(), "B", Layout::LlavaHf, 2, 3, Some(2));
    let whole = |module: &str| {
        format!("  {module}:\n    models:\n      - model: ./A\n      - model: ./B\n")
    };
    let all = format!(
        "{}{}{}",
        whole("text_decoder"),
        whole("vision_tower"),
        whole("multi_modal_projector")
    );
    let config = |modules: &str| {
        format!("merge_method: linear\nparameters:\n  weight: 1.0\nmodules:\n{modules}")
    };
    for (yaml, needle) in [
        (
            config(&format!("{all}{}", whole("audio_tower"))),
            "`audio_tower` is not a module flatmerge knows; modules are `text_decoder`, `multi_modal_projector`, `vision_tower`",
        ),
        (
            config(&whole("text_decoder")),
            "`modules:` lists text_decoder, but",
        ),
        (
            config(&format!(
                "{}{}  vision_tower:\n    models:\n      - model: ./A\n    slices:\n      - sources:\n          - model: ./A\n            layer_range: [0, 1]\n",
                whole("text_decoder"),
                whole("multi_modal_projector")
            )),
            "gives either `models:` or `slices:`, exactly one",
        ),
        (
            config(&format!(
                "{}{}  vision_tower:\n    slices:\n      - sources:\n          - model: ./A\n            layer_range: [0, 5]\n",
                whole("text_decoder"),
                whole("multi_modal_projector")
            )),
            "`modules.vision_tower.slices[0].sources[0].layer_range` is [0, 5), but",
        ),
        (
            format!("{}models:\n  - model: ./A\n", config(&all)),
            "one of `models:`, `slices:` or `modules:`",
        ),
        (
            format!(
                "merge_method: regmean_plusplus\nprobe_set: ./p.jsonl\nmodules:\n{}",
                whole("text_decoder")
            ),
            "needs whole models",
        ),
        (
            config(&format!(
                "{}{}  vision_tower:\n    parameters:\n      weight: 1.0\n",
                whole("text_decoder"),
                whole("multi_modal_projector")
            )),
            "`modules.vision_tower`: line",
        ),
    ] {
        assert_refused(dir.path(), &yaml, needle);
    }
}
