//! Fixtures shared by the workspace-level integration tests (`tests/*.rs`)
//! and benchmarks: small generated model families, merges run with given
//! options, checkpoints read back as plain values, and model directories
//! re-written (sharded, edited) through the library's own writer.
//!
//! Every helper panics with a message naming what failed: they are for
//! tests, where a failed fixture is a failed test.

use flatmerge::config::MergeConfig;
use flatmerge::demo::{write_family, DemoFamily, LlamaShape};
use flatmerge::dtype::{decode_f32, Dtype};
use flatmerge::engine::{MergeOptions, MergeSummary, PreparedMerge};
use flatmerge::io::{Checkpoint, OutputTensor, ShardedWriter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tiny LLaMA shape: every tensor fits one work chunk of the engine.
pub const SMALL: LlamaShape = LlamaShape {
    vocab: 64,
    hidden: 32,
    intermediate: 88,
    layers: 2,
};

/// Elements per work chunk of the engine (`CHUNK_ELEMENTS` in
/// `core/src/engine.rs`, private there): tensors above it are split.
pub const ENGINE_CHUNK_ELEMENTS: usize = 1 << 16;

/// A shape whose embeddings, `lm_head`, MLP weights (SAFE-M, rows of 64 and
/// of 1032 columns) span several engine chunks, so that thread counts and
/// chunk boundaries matter; still small (about 0.57 M parameters).
pub const CHUNKED: LlamaShape = LlamaShape {
    vocab: 1100,
    hidden: 64,
    intermediate: 1032,
    layers: 2,
};

/// Writes a generated family (`C`, `A`, `B`, `B2`, …, statistics and
/// `safe_m.yaml`) under `dir`.
pub fn family(
    dir: &Path,
    shape: &LlamaShape,
    dtype: Dtype,
    contributors: usize,
    seed: u64,
) -> DemoFamily {
    write_family(dir, shape, dtype, contributors, seed)
        .unwrap_or_else(|e| panic!("cannot write a demo family under {}: {e}", dir.display()))
}

/// The family's config as generated.
pub fn config(family: &DemoFamily) -> MergeConfig {
    MergeConfig::from_file(&family.config)
        .unwrap_or_else(|e| panic!("generated config does not load: {e}"))
}

/// Rewrites the family's `safe_m.yaml` with `edit` and loads it.
pub fn edit_config(family: &DemoFamily, edit: impl FnOnce(String) -> String) -> MergeConfig {
    let text = std::fs::read_to_string(&family.config).expect("read the generated config");
    std::fs::write(&family.config, edit(text)).expect("write the edited config");
    config(family)
}

/// Options for a merge into `out_dir`.
pub fn options(
    out_dir: &Path,
    threads: Option<usize>,
    max_shard_bytes: Option<u64>,
) -> MergeOptions<'static> {
    MergeOptions {
        out_dir: out_dir.to_path_buf(),
        max_shard_bytes,
        threads,
        ..MergeOptions::default()
    }
}

/// Plans and runs `config` into `out_dir`.
pub fn merge(
    config: MergeConfig,
    out_dir: &Path,
    threads: Option<usize>,
    max_shard_bytes: Option<u64>,
) -> MergeSummary {
    let prepared = PreparedMerge::new(config).unwrap_or_else(|e| panic!("planning failed: {e}"));
    prepared
        .run(&options(out_dir, threads, max_shard_bytes))
        .unwrap_or_else(|e| panic!("merge into {} failed: {e}", out_dir.display()))
}

/// One tensor read back: dtype, shape and little-endian bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

/// Dtype, shape and a few values: a failed comparison of whole
/// checkpoints stays readable.
impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: Vec<f32> = if self.dtype.is_float() {
            self.values().into_iter().take(4).collect()
        } else {
            Vec::new()
        };
        write!(
            f,
            "Tensor({} {:?}, {} bytes, first values {head:?})",
            self.dtype,
            self.shape,
            self.data.len()
        )
    }
}

impl Tensor {
    /// The values decoded to f32 (F32, F16, BF16 only).
    pub fn values(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.data.len() / self.dtype.size()];
        decode_f32(self.dtype, &self.data, &mut out);
        out
    }

    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of the checkpoint at `path` (file, directory or shards), in
/// the checkpoint's order.
pub fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    let checkpoint =
        Checkpoint::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    checkpoint
        .tensors()
        .iter()
        .map(|info| {
            let view = checkpoint
                .view(&info.name)
                .expect("listed tensor has a view");
            let tensor = Tensor {
                dtype: view.dtype,
                shape: view.shape.to_vec(),
                data: view.data.to_vec(),
            };
            (info.name.clone(), tensor)
        })
        .collect()
}

/// [`read_tensors`] as a map by name.
pub fn tensor_map(path: &Path) -> BTreeMap<String, Tensor> {
    read_tensors(path).into_iter().collect()
}

/// The regular files directly in `dir`, by name, with their bytes.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    entries
        .map(|e| e.expect("directory entry"))
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read file"),
            )
        })
        .collect()
}

/// Writes `yaml` to `dir/bad.yaml` and checks that the merge it asks for
/// fails at some stage with one error that contains `needle` and names
/// the config file, writing nothing: what a bad config must get.
pub fn assert_refused(dir: &Path, yaml: &str, needle: &str) {
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = dir.join("never");
    let result = MergeConfig::from_file(&path)
        .and_then(PreparedMerge::new)
        .and_then(|p| p.run(&options(&out, Some(1), None)));
    let e = result.err().unwrap_or_else(|| panic!("accepted:\n{yaml}"));
    let text = e.to_string();
    assert!(text.contains(needle), "{yaml}\n→ {text}");
    assert!(text.contains("bad.yaml"), "names the config file: {text}");
    assert!(!out.exists(), "nothing written");
    assert!(leftovers(dir).is_empty());
}

/// Entries of `parent` that a writer leaves behind only by mistake: hidden
/// temporary (`.name.tmp-*`) or set-aside (`.name.old-*`) directories and files.
pub fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", parent.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with('.') && (n.contains(".tmp-") || n.contains(".old-")))
        .collect()
}

/// What [`rewrite_model`] does with one tensor of the source.
pub enum Edit {
    /// Keep it as it is.
    Keep,
    /// Leave it out.
    Drop,
    /// Write this instead (under the same name).
    Replace(Tensor),
}

/// Re-writes the model at `src` into the directory `dst` through
/// [`ShardedWriter`] (shards of at most `max_shard_bytes`, or one file),
/// applying `edit` to each tensor and appending `extra` tensors; copies the
/// source directory's `config.json` when it has one.
pub fn rewrite_model(
    src: &Path,
    dst: &Path,
    max_shard_bytes: Option<u64>,
    mut edit: impl FnMut(&str, &Tensor) -> Edit,
    extra: Vec<(String, Tensor)>,
) -> PathBuf {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, tensor) in read_tensors(src) {
        match edit(&name, &tensor) {
            Edit::Keep => tensors.push((name, tensor)),
            Edit::Drop => {}
            Edit::Replace(t) => tensors.push((name, t)),
        }
    }
    tensors.extend(extra);
    write_model(dst, &tensors, max_shard_bytes);
    let src_dir = if src.is_dir() {
        src.to_path_buf()
    } else {
        src.parent().expect("file has a parent").to_path_buf()
    };
    let config = src_dir.join("config.json");
    if config.is_file() {
        std::fs::copy(&config, dst.join("config.json")).expect("copy config.json");
    }
    dst.to_path_buf()
}

/// Writes `tensors` as a model directory `dst` (one file or shards).
pub fn write_model(dst: &Path, tensors: &[(String, Tensor)], max_shard_bytes: Option<u64>) {
    let outputs: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, t)| OutputTensor::new(n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = ShardedWriter::create(dst, outputs, max_shard_bytes, metadata, false)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dst.display()));
    for (name, tensor) in tensors {
        writer
            .write_tensor(name, &tensor.data)
            .unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }
    writer
        .finish()
        .unwrap_or_else(|e| panic!("cannot finish {}: {e}", dst.display()));
}

/// A tensor of `dtype` holding `values`.
pub fn tensor_of(dtype: Dtype, shape: Vec<usize>, values: &[f32]) -> Tensor {
    assert_eq!(
        shape.iter().product::<usize>(),
        values.len(),
        "tensor_of: shape and values disagree"
    );
    let mut data = vec![0u8; values.len() * dtype.size()];
    flatmerge::dtype::encode_f32(dtype, values, &mut data);
    Tensor { dtype, shape, data }
}

/// `merge_report.json` of an output directory, parsed.
pub fn report(out_dir: &Path) -> serde_json::Value {
    let path = out_dir.join("merge_report.json");
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The header of a safetensors file: the JSON object and the byte length
/// of the data section.
pub fn safetensors_header(path: &Path) -> (serde_json::Map<String, serde_json::Value>, u64) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header is JSON");
    let object = header.as_object().expect("header is an object").clone();
    (object, (bytes.len() - 8 - n) as u64)
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

// ---- Hand-written F32 models and merges from YAML text (baseline tests) ----

/// Writes an F32 model directory `dir` holding `tensors` (name, shape,
/// values), in this order, as one safetensors file.
pub fn write_f32_model(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let tensors: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            (
                name.to_string(),
                tensor_of(Dtype::F32, shape.clone(), values),
            )
        })
        .collect();
    write_model(dir, &tensors, None);
    dir.to_path_buf()
}

/// Parses `yaml` (relative paths resolve against `dir`), sets the DARE /
/// DELLA `seed`, plans and runs the merge into `out` with `threads`
/// workers: what `flatmerge merge config.yaml out --random-seed seed` does.
/// Returns the first error of any stage.
pub fn try_merge_yaml(
    dir: &Path,
    yaml: &str,
    seed: u64,
    threads: Option<usize>,
    out: &Path,
) -> flatmerge::Result<MergeSummary> {
    let mut config = MergeConfig::from_yaml(yaml, dir, None)?;
    config.seed = seed;
    PreparedMerge::new(config)?.run(&options(out, threads, None))
}

/// Every tensor of the checkpoint at `path` decoded to f32, by name.
pub fn f32_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    read_tensors(path)
        .into_iter()
        .map(|(name, t)| (name, t.values()))
        .collect()
}

/// The uniform number SPEC §3 draws for DARE element `i` of contributor `k`
/// (0-based among the contributors) on tensor `name` under `seed`, written
/// out from the SPEC independently of `flatmerge::baselines`: element `i`
/// is kept when this is `< density`.
pub fn spec_dare_uniform(seed: u64, k: usize, name: &str, i: u64) -> f64 {
    let mut key = 0xCBF2_9CE4_8422_2325u64;
    for b in format!("{seed}:{k}:{name}").bytes() {
        key ^= u64::from(b);
        key = key.wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut z = key.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// `X` (`[rows, n]`, row-major) with `X · lhs = rhs` for a symmetric
/// invertible `lhs` (`[n, n]`): Gauss–Jordan elimination with partial
/// pivoting in f64, independent of the library's solver (least-squares
/// merges' reference).
pub fn solve_right_symmetric(lhs: &[f64], rhs: &[f64], n: usize) -> Vec<f64> {
    let rows = rhs.len() / n;
    assert_eq!(lhs.len(), n * n);
    assert_eq!(rhs.len(), rows * n);
    // X·lhs = rhs ⇔ lhs·Xᵀ = rhsᵀ (lhs symmetric): eliminate on [lhs | rhsᵀ].
    let mut a = lhs.to_vec();
    let mut x: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..rows).map(|r| rhs[r * n + c]).collect())
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .expect("a column");
        for k in 0..n {
            a.swap(col * n + k, pivot * n + k);
        }
        x.swap(col, pivot);
        for row in 0..n {
            if row != col {
                let f = a[row * n + col] / a[col * n + col];
                for k in 0..n {
                    a[row * n + k] -= f * a[col * n + k];
                }
                let pivot_row = x[col].clone();
                for (v, p) in x[row].iter_mut().zip(&pivot_row) {
                    *v -= f * p;
                }
            }
        }
    }
    let mut out = vec![0f64; rows * n];
    for (c, xc) in x.iter().enumerate() {
        for r in 0..rows {
            out[r * n + c] = xc[r] / a[c * n + c];
        }
    }
    out
}
