//! The CogVLM maps (`llava-1.5-to-cogvlm`, `llava-hf-to-cogvlm`,
//! `mplug-owl2-to-cogvlm`) on small imitation checkpoints built from the
//! documented tensor lists (THUDM's `modeling_cogvlm.py`,
//! `heterogeneous-pairs.md`, transformers' llava-hf names): CogVLM's
//! visual-expert layers as A, LLaVA in the original layout and both
//! llava-hf namings, and mPLUG-Owl2, as B. No Python, no downloads.
//!
//! Shown: `flatmerge map --name-map auto --strict -a` picks the map and
//! puts every tensor of both models in exactly one class; the FAM merge
//! runs under `--strict` with `name_map: auto`; each fused qkv is
//! `(A + [q; k; v]) / 2` row by row with B's q, k and v in CogVLM's order
//! (the copies of mPLUG-Owl2's modality each expert's own); both experts'
//! MLP groups recover the planted neuron permutations; `--strict` fails
//! exactly on the unaccounted tensors; a pair no map fits gets one line.

use flatmerge::demo::{matvec, Rng};
use flatmerge::io::{OutputTensor, SafetensorsWriter};
use flatmerge::stats::{ActivationStats, LayerStats, Rows};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const H: usize = 8;
const MLP: usize = 12;
const LAYERS: usize = 2;
const VOCAB: usize = 16;
const EXAMPLES: usize = 48;
/// Offsets planted in B's attention rows, so each block of a fused qkv
/// shows where it came from: q, the text copies of k and v (LLaVA's only
/// ones), the image copies of k and v.
const Q: f32 = 10.0;
const K_TEXT: f32 = 20.0;
const V_TEXT: f32 = 30.0;
const K_IMAGE: f32 = 40.0;
const V_IMAGE: f32 = 50.0;

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn flatmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmerge"))
        .args(args)
        .output()
        .expect("run flatmerge")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_model(dir: &Path, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, s, _)| OutputTensor {
            name: n.clone(),
            dtype: flatmerge::dtype::Dtype::F32,
            shape: s.clone(),
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = SafetensorsWriter::create(&dir.join("model.safetensors"), &outputs, &meta).unwrap();
    for (name, _, values) in tensors {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor(name, &bytes).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), "{}\n").unwrap();
}

fn read(dir: &Path, name: &str) -> Vec<f32> {
    flatmerge::io::Checkpoint::open(dir)
        .unwrap()
        .view(name)
        .unwrap_or_else(|| panic!("{name} in {}", dir.display()))
        .to_f32_vec()
}

/// Statistics of one model on the shared probe: per linear layer, the
/// per-example inputs given and the outputs `x Wᵀ`.
struct Stats(ActivationStats);

impl Stats {
    fn new(model: &str) -> Stats {
        let mut s = ActivationStats::new(model, "shared synthetic probe");
        s.examples = EXAMPLES as u64;
        s.modality = Some((0..EXAMPLES).map(|i| (i % 2) as u8).collect());
        Stats(s)
    }

    fn record(&mut self, layer: &str, x: &[f32], w: &[f32]) -> Vec<f32> {
        let width = x.len() / EXAMPLES;
        let y: Vec<f32> = x.chunks_exact(width).flat_map(|r| matvec(w, r)).collect();
        let out = y.len() / EXAMPLES;
        let mean = |rows: &[f32], width: usize| -> Vec<f32> {
            (0..width)
                .map(|i| (0..EXAMPLES).map(|s| rows[s * width + i]).sum::<f32>() / EXAMPLES as f32)
                .collect()
        };
        let rows = |data: &[f32], width| Rows {
            rows: EXAMPLES,
            width,
            data: data.to_vec(),
        };
        self.0.layers.insert(
            layer.to_string(),
            LayerStats {
                x_mean: Some(mean(x, width)),
                y_mean: Some(mean(&y, out)),
                count: Some(EXAMPLES as u64),
                x_rows: Some(rows(x, width)),
                y_rows: Some(rows(&y, out)),
                x_gram: None,
            },
        );
        y
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn shuffled(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    p
}

/// Rows of `w` (`[rows, cols]`) reordered: row `perm[i]` of the result is row `i` of `w`.
fn scatter_rows(w: &[f32], perm: &[usize], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (i, &p) in perm.iter().enumerate() {
        out[p * cols..(p + 1) * cols].copy_from_slice(&w[i * cols..(i + 1) * cols]);
    }
    out
}

/// Columns of `w` (`[rows, perm.len()]`) reordered alike.
fn scatter_cols(w: &[f32], perm: &[usize]) -> Vec<f32> {
    let cols = perm.len();
    let mut out = vec![0f32; w.len()];
    for r in 0..w.len() / cols {
        for (i, &p) in perm.iter().enumerate() {
            out[r * cols + p] = w[r * cols + i];
        }
    }
    out
}

fn plus(w: &[f32], rng: &mut Rng, scale: f32, offset: f32) -> Vec<f32> {
    w.iter()
        .map(|v| v + offset + scale * rng.normal())
        .collect()
}

/// The layouts, their statistics, and the planted permutations.
struct Models {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// Per layer: B's MLP neuron `pi[i]` is A's language neuron `i`.
    pi: Vec<Vec<usize>>,
    /// Per layer: A's vision neuron `i` is A's language neuron `sigma[i]`.
    sigma: Vec<Vec<usize>>,
}

/// B's naming of its decoder stack and head.
#[derive(Clone, Copy)]
enum Naming {
    Original,
    HfSaved,
    HfMemory,
}

impl Naming {
    fn rename(self, name: &str) -> String {
        match self {
            Naming::Original => name.to_string(),
            Naming::HfSaved if name == "lm_head.weight" => "language_model.lm_head.weight".into(),
            Naming::HfSaved => name.replacen("model.", "language_model.model.", 1),
            Naming::HfMemory if name == "lm_head.weight" => name.into(),
            Naming::HfMemory => name.replacen("model.", "model.language_model.", 1),
        }
    }
}

impl Models {
    fn build() -> Models {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let seed = 17;
        let normal = |name: &str, n: usize, s: f32| Rng::new(seed, name).normals(n, s);
        let mut noise = Rng::new(seed, "noise");
        let mut cog: Tensors = Vec::new();
        let mut llava: Tensors = Vec::new();
        let mut owl: Tensors = Vec::new();
        let (mut s_cog, mut s_llava, mut s_owl) = (
            Stats::new("cogvlm"),
            Stats::new("llava"),
            Stats::new("owl2"),
        );
        let (mut pi, mut sigma) = (Vec::new(), Vec::new());
        for global in ["model.embed_tokens.weight", "lm_head.weight"] {
            let w = normal(global, VOCAB * H, 0.1);
            for (t, s) in [(&mut llava, 0.01), (&mut owl, 0.01), (&mut cog, 0.0)] {
                t.push((global.into(), vec![VOCAB, H], plus(&w, &mut noise, s, 0.0)));
            }
        }
        for l in 0..LAYERS {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let x: Vec<f32> = {
                let mut rng = Rng::new(seed, &format!("probe {l}"));
                (0..EXAMPLES)
                    .flat_map(|s| {
                        let shift = if s % 2 == 1 { 0.5 } else { -0.5 };
                        (0..H).map(|_| rng.normal() + shift).collect::<Vec<_>>()
                    })
                    .collect()
            };
            let attn_out = Rng::new(seed, &format!("attention {l}")).normals(EXAMPLES * H, 1.0);
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                let w: Vec<f32> = normal(&p(norm), H, 0.05).iter().map(|v| 1.0 + v).collect();
                cog.push((p(&format!("{norm}.weight")), vec![H], w.clone()));
                llava.push((
                    p(&format!("{norm}.weight")),
                    vec![H],
                    plus(&w, &mut noise, 0.01, 0.0),
                ));
                for copy in 0..2 {
                    let offset = 0.1 * copy as f32;
                    owl.push((
                        p(&format!("{norm}.multiway.{copy}.weight")),
                        vec![H],
                        plus(&w, &mut noise, 0.01, offset),
                    ));
                }
            }
            // A's experts: own fused qkv and dense per expert.
            for expert in ["language", "vision"] {
                let qkv = p(&format!("self_attn.{expert}_expert_query_key_value"));
                let w = normal(&qkv, 3 * H * H, 0.1);
                s_cog.record(&qkv, &x, &w);
                cog.push((format!("{qkv}.weight"), vec![3 * H, H], w));
                let dense = p(&format!("self_attn.{expert}_expert_dense"));
                let w = normal(&dense, H * H, 0.1);
                s_cog.record(&dense, &attn_out, &w);
                cog.push((format!("{dense}.weight"), vec![H, H], w));
            }
            // B's attention: q, k, v with the planted offsets; o_proj.
            let base = |n: &str| normal(&p(n), H * H, 0.1);
            let (q, k, v, o) = (base("q"), base("k"), base("v"), base("o"));
            let q = plus(&q, &mut noise, 0.0, Q);
            for (name, w, x_in) in [
                ("self_attn.q_proj", q.clone(), &x),
                ("self_attn.k_proj", plus(&k, &mut noise, 0.0, K_TEXT), &x),
                ("self_attn.v_proj", plus(&v, &mut noise, 0.0, V_TEXT), &x),
                ("self_attn.o_proj", o.clone(), &attn_out),
            ] {
                s_llava.record(&p(name), x_in, &w);
                llava.push((p(&format!("{name}.weight")), vec![H, H], w));
            }
            for (name, w, x_in) in [
                ("self_attn.q_proj", q, &x),
                (
                    "self_attn.k_proj.multiway.0",
                    plus(&k, &mut noise, 0.0, K_TEXT),
                    &x,
                ),
                (
                    "self_attn.k_proj.multiway.1",
                    plus(&k, &mut noise, 0.0, K_IMAGE),
                    &x,
                ),
                (
                    "self_attn.v_proj.multiway.0",
                    plus(&v, &mut noise, 0.0, V_TEXT),
                    &x,
                ),
                (
                    "self_attn.v_proj.multiway.1",
                    plus(&v, &mut noise, 0.0, V_IMAGE),
                    &x,
                ),
                ("self_attn.o_proj", o, &attn_out),
            ] {
                s_owl.record(&p(name), x_in, &w);
                owl.push((p(&format!("{name}.weight")), vec![H, H], w));
            }
            // The MLP: A's vision expert is its language expert's neurons
            // permuted (sigma), B's MLP the same neurons permuted (pi).
            let mut rng = Rng::new(seed, &format!("permutations {l}"));
            let (pl, sl) = (shuffled(&mut rng, MLP), shuffled(&mut rng, MLP));
            let gate = normal(&p("gate"), MLP * H, 0.3);
            let up = normal(&p("up"), MLP * H, 0.3);
            let down = normal(&p("down"), H * MLP, 0.2);
            // Vision neuron i is language neuron sigma[i]: gather.
            let gather = |w: &[f32]| -> Vec<f32> {
                sl.iter()
                    .flat_map(|&j| w[j * H..(j + 1) * H].to_vec())
                    .collect()
            };
            let gather_cols = |w: &[f32]| -> Vec<f32> {
                let mut out = Vec::with_capacity(H * MLP);
                for r in 0..H {
                    out.extend(sl.iter().map(|&j| w[r * MLP + j]));
                }
                out
            };
            let mlp_in: Vec<f32> = x.iter().map(|v| v * 0.9).collect();
            let mlp = |stats: &mut Stats, t: &mut Tensors, prefix: &str, ws: [Vec<f32>; 3]| {
                let [g, u, d] = ws;
                let yg = stats.record(&p(&format!("{prefix}gate_proj")), &mlp_in, &g);
                let yu = stats.record(&p(&format!("{prefix}up_proj")), &mlp_in, &u);
                let hidden: Vec<f32> = yg.iter().zip(&yu).map(|(g, u)| silu(*g) * u).collect();
                stats.record(&p(&format!("{prefix}down_proj")), &hidden, &d);
                t.push((p(&format!("{prefix}gate_proj.weight")), vec![MLP, H], g));
                t.push((p(&format!("{prefix}up_proj.weight")), vec![MLP, H], u));
                t.push((p(&format!("{prefix}down_proj.weight")), vec![H, MLP], d));
            };
            mlp(
                &mut s_cog,
                &mut cog,
                "mlp.language_mlp.",
                [gate.clone(), up.clone(), down.clone()],
            );
            let vision = [
                plus(&gather(&gate), &mut noise, 0.01, 0.0),
                plus(&gather(&up), &mut noise, 0.01, 0.0),
                plus(&gather_cols(&down), &mut noise, 0.01, 0.0),
            ];
            mlp(&mut s_cog, &mut cog, "mlp.vision_mlp.", vision);
            let b_mlp = || {
                [
                    scatter_rows(&gate, &pl, H),
                    scatter_rows(&up, &pl, H),
                    scatter_cols(&down, &pl),
                ]
            };
            mlp(&mut s_llava, &mut llava, "mlp.", b_mlp());
            mlp(&mut s_owl, &mut owl, "mlp.", b_mlp());
            cog.push((p("self_attn.rotary_emb.inv_freq"), vec![2], vec![1.0, 0.01]));
            llava.push((p("self_attn.rotary_emb.inv_freq"), vec![2], vec![1.0, 0.01]));
            pi.push(pl);
            sigma.push(sl);
        }
        let w = normal("model.norm", H, 0.05);
        for t in [&mut cog, &mut llava, &mut owl] {
            t.push(("model.norm.weight".into(), vec![H], w.clone()));
        }
        // One side only (shapes from the modelling code, widths scaled down).
        let v = 6;
        let only = |t: &mut Tensors, list: &[(&str, Vec<usize>)]| {
            for (name, shape) in list {
                t.push((
                    name.to_string(),
                    shape.clone(),
                    normal(name, shape.iter().product(), 0.1),
                ));
            }
        };
        only(
            &mut cog,
            &[
                ("model.vision.patch_embedding.proj.weight", vec![v, 3, 2, 2]),
                ("model.vision.patch_embedding.cls_embedding", vec![1, v]),
                (
                    "model.vision.patch_embedding.position_embedding.weight",
                    vec![5, v],
                ),
                (
                    "model.vision.transformer.layers.0.input_layernorm.weight",
                    vec![v],
                ),
                (
                    "model.vision.transformer.layers.0.attention.query_key_value.weight",
                    vec![3 * v, v],
                ),
                (
                    "model.vision.transformer.layers.0.attention.query_key_value.bias",
                    vec![3 * v],
                ),
                (
                    "model.vision.transformer.layers.0.attention.dense.weight",
                    vec![v, v],
                ),
                (
                    "model.vision.transformer.layers.0.mlp.fc1.weight",
                    vec![2 * v, v],
                ),
                (
                    "model.vision.transformer.layers.0.mlp.fc2.weight",
                    vec![v, 2 * v],
                ),
                ("model.vision.linear_proj.linear_proj.weight", vec![H, v]),
                ("model.vision.linear_proj.norm1.weight", vec![H]),
                ("model.vision.linear_proj.gate_proj.weight", vec![MLP, H]),
                (
                    "model.vision.linear_proj.dense_h_to_4h.weight",
                    vec![MLP, H],
                ),
                (
                    "model.vision.linear_proj.dense_4h_to_h.weight",
                    vec![H, MLP],
                ),
                ("model.vision.boi", vec![1, 1, H]),
                ("model.vision.eoi", vec![1, 1, H]),
            ],
        );
        only(
            &mut owl,
            &[
                ("model.vision_model.embeddings.cls_token", vec![1, 1, v]),
                (
                    "model.vision_model.encoder.layers.0.mlp.fc1.weight",
                    vec![2 * v, v],
                ),
                ("model.visual_abstractor.visual_fc.weight", vec![H, v]),
                ("model.visual_abstractor.vit_eos", vec![1, 1, H]),
            ],
        );
        let projector = [
            ("model.mm_projector.0.weight", vec![H, v]),
            ("model.mm_projector.0.bias", vec![H]),
            ("model.mm_projector.2.weight", vec![H, H]),
            ("model.mm_projector.2.bias", vec![H]),
        ];
        write_model(&root.join("cogvlm"), &cog);
        s_cog
            .0
            .save(&root.join("cogvlm.stats.safetensors"))
            .unwrap();
        write_model(&root.join("mplug-owl2"), &owl);
        s_owl
            .0
            .save(&root.join("mplug-owl2.stats.safetensors"))
            .unwrap();
        for (kind, naming) in [
            ("llava-original", Naming::Original),
            ("llava", Naming::HfSaved),
            ("llava-memory", Naming::HfMemory),
        ] {
            let mut t: Tensors = llava
                .iter()
                .filter(|(n, _, _)| !matches!(naming, Naming::HfMemory) || !n.contains("inv_freq"))
                .map(|(n, s, w)| (naming.rename(n), s.clone(), w.clone()))
                .collect();
            let mut stats = Stats::new(kind);
            for (layer, l) in &s_llava.0.layers {
                stats.0.layers.insert(naming.rename(layer), l.clone());
            }
            match naming {
                Naming::Original => only(&mut t, &projector),
                _ => {
                    let prefix = if matches!(naming, Naming::HfMemory) {
                        "model."
                    } else {
                        ""
                    };
                    for (name, shape) in [
                        ("multi_modal_projector.linear_1.weight", vec![H, v]),
                        ("multi_modal_projector.linear_2.bias", vec![H]),
                        ("vision_tower.vision_model.post_layernorm.weight", vec![v]),
                        (
                            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                            vec![2 * v, v],
                        ),
                    ] {
                        let name = format!("{prefix}{name}");
                        t.push((
                            name.clone(),
                            shape.clone(),
                            normal(&name, shape.iter().product(), 0.1),
                        ));
                    }
                }
            }
            write_model(&root.join(kind), &t);
            stats
                .0
                .save(&root.join(format!("{kind}.stats.safetensors")))
                .unwrap();
        }
        Models {
            _dir: dir,
            root,
            pi,
            sigma,
        }
    }

    fn model(&self, kind: &str) -> String {
        self.root.join(kind).display().to_string()
    }

    fn stats(&self, kind: &str) -> String {
        self.root
            .join(format!("{kind}.stats.safetensors"))
            .display()
            .to_string()
    }

    fn map(&self, a: &str, b: &str, extra: &[&str]) -> Output {
        let (ma, mb, sa, sb) = (self.model(a), self.model(b), self.stats(a), self.stats(b));
        let mut args = vec!["map", &ma, &mb, "--stats-a", &sa, "--stats-b", &sb];
        args.extend_from_slice(extra);
        flatmerge(&args)
    }

    fn names(&self, kind: &str) -> Vec<String> {
        flatmerge::io::Checkpoint::open(&self.root.join(kind))
            .unwrap()
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// A copy of model `kind` without the tensor `drop`, as `name`.
    fn without(&self, kind: &str, drop: &str, name: &str) {
        let c = flatmerge::io::Checkpoint::open(&self.root.join(kind)).unwrap();
        let t: Tensors = c
            .tensors()
            .iter()
            .filter(|t| t.name != drop)
            .map(|t| {
                (
                    t.name.clone(),
                    t.shape.clone(),
                    c.view(&t.name).unwrap().to_f32_vec(),
                )
            })
            .collect();
        write_model(&self.root.join(name), &t);
        std::fs::copy(self.stats(kind), self.stats(name)).unwrap();
    }
}

/// The `map -a` listing: for each B tensor its class, and how many times
/// each A tensor is named as a target or kept.
fn listing(stdout: &str) -> (BTreeMap<String, String>, BTreeMap<String, usize>) {
    let mut b = BTreeMap::new();
    let mut a: BTreeMap<String, usize> = BTreeMap::new();
    for line in stdout.lines().map(str::trim) {
        let mut targets = |dst: &str| {
            for t in dst.split(", ") {
                *a.entry(t.to_string()).or_default() += 1;
            }
        };
        if let Some(rest) = line.strip_prefix("concatenated ") {
            // `NAME = P1 + P2 + P3 → A1, A2`: a part may feed several stacks.
            let (_, rest) = rest.split_once(" = ").unwrap();
            let (parts, dst) = rest.split_once(" → ").unwrap();
            for part in parts.split(" + ") {
                let previous = b.insert(part.to_string(), "stacked".to_string());
                assert!(previous.is_none_or(|c| c == "stacked"), "{part} twice");
            }
            targets(dst);
            continue;
        }
        let class = ["mapped", "one-to-many"]
            .into_iter()
            .find(|c| line.starts_with(&format!("{c} ")));
        if let Some(class) = class {
            let (src, dst) = line[class.len()..].trim().split_once(" → ").unwrap();
            assert!(
                b.insert(src.to_string(), class.to_string()).is_none(),
                "{src} twice"
            );
            targets(dst);
        } else if let Some(rest) = line.strip_prefix("kept from A ") {
            *a.entry(rest.trim().to_string()).or_default() += 1;
        } else if let Some(rest) = line.strip_prefix("dropped ") {
            assert!(b
                .insert(rest.trim().to_string(), "dropped".into())
                .is_none());
        }
    }
    (b, a)
}

const PAIRS: [(&str, &str); 4] = [
    ("llava-original", "llava-1.5-to-cogvlm"),
    ("llava", "llava-hf-to-cogvlm"),
    ("llava-memory", "llava-hf-to-cogvlm"),
    ("mplug-owl2", "mplug-owl2-to-cogvlm"),
];

#[test]
fn map_accounts_for_every_tensor_of_each_pair() {
    let m = Models::build();
    let a_names: BTreeSet<String> = m.names("cogvlm").into_iter().collect();
    for (b, expected) in PAIRS {
        let stdout = ok(
            m.map("cogvlm", b, &["--name-map", "auto", "--strict", "-a"]),
            &format!("map cogvlm {b}"),
        );
        assert!(
            stdout.contains(&format!("name map: {expected} (picked by auto)")),
            "{b}: {stdout}"
        );
        assert!(stdout.contains("unaccounted: 0 of A, 0 of B"), "{stdout}");
        let (b_classes, a_counts) = listing(&stdout);
        let b_names: BTreeSet<String> = m.names(b).into_iter().collect();
        assert_eq!(
            b_classes.keys().cloned().collect::<BTreeSet<_>>(),
            b_names,
            "{b}: every tensor of B in one class"
        );
        assert_eq!(
            a_counts.keys().cloned().collect::<BTreeSet<_>>(),
            a_names,
            "{b}: every tensor of A fed or kept"
        );
        assert!(a_counts.values().all(|&n| n == 1), "{b}: {a_counts:?}");
        let count = |class: &str| b_classes.values().filter(|c| *c == class).count();
        // Per layer: o_proj, gate, up, down into both experts.
        assert_eq!(count("one-to-many"), 4 * LAYERS, "{b}");
        if b == "mplug-owl2" {
            // Per layer one q, two copies each of k and v, in two stacks
            // (the shared q in both).
            assert_eq!(count("stacked"), 5 * LAYERS);
            assert!(stdout.contains(&format!(
                "{} concatenated into {} stacked tensors (into {} tensors of A)",
                5 * LAYERS,
                2 * LAYERS,
                2 * LAYERS
            )));
            // The image copies of the norms, and Owl2's vision modules.
            assert_eq!(count("dropped"), 2 * LAYERS + 4);
            assert!(stdout.contains(
                "concatenated model.layers.0.self_attn.{q_proj,k_proj.multiway.1,v_proj.multiway.1}.weight = \
                 model.layers.0.self_attn.q_proj.weight + model.layers.0.self_attn.k_proj.multiway.1.weight + \
                 model.layers.0.self_attn.v_proj.multiway.1.weight → \
                 model.layers.0.self_attn.vision_expert_query_key_value.weight"
            ), "{stdout}");
        } else {
            assert_eq!(count("stacked"), 3 * LAYERS);
            assert!(stdout.contains(&format!(
                "{} concatenated into {} stacked tensors (into {} tensors of A)",
                3 * LAYERS,
                LAYERS,
                2 * LAYERS
            )));
        }
    }
}

#[test]
fn the_merge_feeds_each_expert_the_right_rows_and_aligns_both_mlps() {
    let m = Models::build();
    for (b, expected) in PAIRS {
        let config = m.root.join(format!("{b}.yaml"));
        std::fs::write(
            &config,
            format!(
                "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
                m.model("cogvlm"),
                m.stats("cogvlm"),
                m.model(b),
                m.stats(b)
            ),
        )
        .unwrap();
        let out = m.root.join(format!("merged-{b}"));
        let (config, out_s) = (config.display().to_string(), out.display().to_string());
        ok(
            flatmerge(&["merge", &config, &out_s, "--strict", "-q"]),
            &format!("merge {b}"),
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("merge_report.json")).unwrap()).unwrap();
        let used = &report["fam"]["name_map"];
        assert_eq!(used["map"], expected, "{used}");
        assert_eq!(used["detected"], true);
        let stacks = used["concatenated"].as_array().unwrap();
        let per_layer = if b == "mplug-owl2" { 2 } else { 1 };
        assert_eq!(stacks.len(), per_layer * LAYERS);
        assert_eq!(
            m.names(&format!("merged-{b}")).len(),
            m.names("cogvlm").len(),
            "A's tensors"
        );

        // Each fused qkv: rows [q; k; v] of B averaged with A's (the
        // defaults fuse rows no group owns to the average, SPEC §2.4).
        let (a_dir, b_dir) = (m.root.join("cogvlm"), m.root.join(b));
        let b_name = |n: &str| match b {
            "llava" => format!("language_model.{n}"),
            "llava-memory" => n.replacen("model.", "model.language_model.", 1),
            _ => n.to_string(),
        };
        for l in 0..LAYERS {
            for (expert, copy, k_off, v_off) in [
                ("language", 0, K_TEXT, V_TEXT),
                (
                    "vision",
                    1,
                    if b == "mplug-owl2" { K_IMAGE } else { K_TEXT },
                    if b == "mplug-owl2" { V_IMAGE } else { V_TEXT },
                ),
            ] {
                let name =
                    format!("model.layers.{l}.self_attn.{expert}_expert_query_key_value.weight");
                let merged = read(&out, &name);
                let a = read(&a_dir, &name);
                let part = |p: &str| {
                    let n = if b == "mplug-owl2" && p != "q_proj" {
                        format!("model.layers.{l}.self_attn.{p}.multiway.{copy}.weight")
                    } else {
                        b_name(&format!("model.layers.{l}.self_attn.{p}.weight"))
                    };
                    read(&b_dir, &n)
                };
                let stacked: Vec<f32> = [part("q_proj"), part("k_proj"), part("v_proj")].concat();
                assert_eq!(merged.len(), 3 * H * H);
                for (i, ((m_, a_), b_)) in merged.iter().zip(&a).zip(&stacked).enumerate() {
                    let want = 0.5 * (a_ + b_);
                    assert!(
                        (m_ - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{name}[{i}]: {m_} vs {want}"
                    );
                }
                // Block means show the blocks' sources: half of each offset
                // (A's rows average near zero).
                for (block, offset) in [(0, Q), (1, k_off), (2, v_off)] {
                    let rows = &merged[block * H * H..(block + 1) * H * H];
                    let mean = rows.iter().sum::<f32>() / rows.len() as f32;
                    assert!(
                        (mean - offset / 2.0).abs() < 0.2,
                        "{name} block {block}: mean {mean}"
                    );
                }
            }
            // o_proj into both experts' dense.
            for expert in ["language", "vision"] {
                let name = format!("model.layers.{l}.self_attn.{expert}_expert_dense.weight");
                let (mo, a) = (read(&out, &name), read(&a_dir, &name));
                let o = read(
                    &b_dir,
                    &b_name(&format!("model.layers.{l}.self_attn.o_proj.weight")),
                );
                for ((x, y), z) in mo.iter().zip(&a).zip(&o) {
                    assert!((x - 0.5 * (y + z)).abs() < 1e-5);
                }
            }
        }
        // Norms: mPLUG-Owl2's text copy feeds CogVLM's shared norm.
        let norm = "model.layers.1.post_attention_layernorm.weight";
        let b_norm = match b {
            "mplug-owl2" => "model.layers.1.post_attention_layernorm.multiway.0.weight".to_string(),
            _ => b_name(norm),
        };
        let (mn, an, bn) = (read(&out, norm), read(&a_dir, norm), read(&b_dir, &b_norm));
        for i in 0..H {
            assert!((mn[i] - 0.5 * (an[i] + bn[i])).abs() < 1e-6, "{norm}[{i}]");
        }
        // A's vision tower and rotary buffers are A's.
        for kept in [
            "model.vision.transformer.layers.0.attention.query_key_value.weight",
            "model.vision.boi",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
        ] {
            assert_eq!(read(&out, kept), read(&a_dir, kept), "{kept}");
        }
        // Both experts' MLP groups recover the planted permutations: A's
        // language neuron i is B's pi[i]; A's vision neuron i is language
        // neuron sigma[i], so B's pi[sigma[i]].
        let mapping = report["fam"]["mapping"].as_array().unwrap();
        assert_eq!(mapping.len(), 2 * LAYERS, "one group per expert and layer");
        for l in 0..LAYERS {
            for (expert, want) in [
                ("language", m.pi[l].clone()),
                (
                    "vision",
                    m.sigma[l].iter().map(|&s| m.pi[l][s]).collect::<Vec<_>>(),
                ),
            ] {
                let group = format!("model.layers.{l}.mlp.{expert}_mlp");
                let got = mapping
                    .iter()
                    .find(|g| g["group"] == group.as_str())
                    .unwrap_or_else(|| panic!("{group} in {mapping:?}"))["b_neuron_of_a"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Vec<_>>();
                let recovered = got
                    .iter()
                    .zip(&want)
                    .filter(|(g, w)| **g == Some(**w))
                    .count();
                assert_eq!(recovered, MLP, "{b} {group}: {got:?} vs {want:?}");
            }
        }
    }
}

#[test]
fn strict_fails_exactly_on_the_unaccounted_tensors() {
    let m = Models::build();
    // B without one v_proj: that layer's q and k have no stack, and A's two
    // fused qkv of the layer no source.
    m.without(
        "llava-original",
        "model.layers.1.self_attn.v_proj.weight",
        "llava-no-v",
    );
    // A without one vision_mlp.up_proj: B's up_proj of that layer feeds
    // only the language expert, which the map does not account for.
    m.without(
        "cogvlm",
        "model.layers.0.mlp.vision_mlp.up_proj.weight",
        "cogvlm-no-up",
    );
    for (a, b, of_a, of_b) in [
        ("cogvlm", "llava-no-v", 2, 2),
        ("cogvlm-no-up", "llava-original", 1, 1),
    ] {
        let stdout = ok(m.map(a, b, &["--name-map", "llava-1.5-to-cogvlm"]), "map");
        assert!(
            stdout.contains(&format!("unaccounted: {of_a} of A, {of_b} of B")),
            "{a} {b}: {stdout}"
        );
        let unaccounted: BTreeSet<String> = stdout
            .lines()
            .filter_map(|l| l.trim().strip_prefix("unaccounted  "))
            .map(|l| l[2..].to_string())
            .collect();
        assert_eq!(unaccounted.len(), of_a + of_b);
        let strict = m.map(a, b, &["--name-map", "llava-1.5-to-cogvlm", "--strict"]);
        assert!(!strict.status.success());
        let stderr = String::from_utf8_lossy(&strict.stderr);
        assert!(
            stderr.contains(&format!("{} problems", of_a + of_b)),
            "{stderr}"
        );
        let flagged: BTreeSet<String> = stderr
            .lines()
            .filter(|l| l.contains("--strict"))
            .map(|l| l.split('`').nth(1).unwrap().to_string())
            .collect();
        assert_eq!(flagged, unaccounted, "{stderr}");
    }
}

#[test]
fn a_pair_no_map_fits_gets_one_line_and_no_output() {
    let m = Models::build();
    // A LLaVA with a tensor no map knows: the CogVLM map is nearest.
    let c = flatmerge::io::Checkpoint::open(&m.root.join("llava-original")).unwrap();
    let mut t: Tensors = c
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                c.view(&t.name).unwrap().to_f32_vec(),
            )
        })
        .collect();
    t.push(("model.extra.weight".into(), vec![H], vec![0.0; H]));
    write_model(&m.root.join("llava-extra"), &t);
    std::fs::copy(m.stats("llava-original"), m.stats("llava-extra")).unwrap();
    let e = m.map("cogvlm", "llava-extra", &["--name-map", "auto"]);
    assert!(!e.status.success());
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(
            "nearest `llava-1.5-to-cogvlm` leaves 1 unaccounted, first B `model.extra.weight`"
        ),
        "{stderr}"
    );
    let config = m.root.join("none.yaml");
    std::fs::write(
        &config,
        format!(
            "merge_method: fam\nname_map: auto\nmodels:\n  - model: {}\n    stats: {}\n  - model: {}\n    stats: {}\n",
            m.model("cogvlm"),
            m.stats("cogvlm"),
            m.model("llava-extra"),
            m.stats("llava-extra")
        ),
    )
    .unwrap();
    let out = m.root.join("never");
    let e = flatmerge(&[
        "merge",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(!e.status.success());
    assert!(!out.exists(), "nothing written");
}
