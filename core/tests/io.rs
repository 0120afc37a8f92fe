//! Checkpoint reading, streaming writing and statistics files: round trips
//! and one test per error class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flatmerge::dtype::{encode_f32, Dtype};
use flatmerge::io::{
    write_atomically, Checkpoint, OutputTensor, SafetensorsWriter, ShardedWriter, INDEX_FILE,
    SINGLE_FILE,
};
use flatmerge::stats::{ActivationStats, LayerStats, Rows};
use flatmerge::{Error, ErrorKind};

// ---------------------------------------------------------------- helpers

fn values(n: usize, seed: f32) -> Vec<f32> {
    // Multiples of 1/8 up to ±64: exact in F32, F16 and BF16.
    (0..n)
        .map(|i| ((i as f32 * 7.0 + seed) % 128.0 - 64.0) / 8.0)
        .collect()
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * dtype.size()];
    encode_f32(dtype, v, &mut out);
    out
}

/// A small model: F32, F16, BF16, an I64 buffer and a scalar.
fn model() -> Vec<(OutputTensor, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (name, dtype, shape)) in [
        ("model.embed_tokens.weight", Dtype::BF16, vec![16, 8]),
        ("model.layers.0.mlp.up_proj.weight", Dtype::F32, vec![12, 8]),
        ("model.layers.0.mlp.up_proj.bias", Dtype::F16, vec![12]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            vec![8, 8],
        ),
        ("model.norm.weight", Dtype::F32, vec![8]),
        ("lm_head.weight", Dtype::BF16, vec![16, 8]),
        ("scale", Dtype::F32, vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = shape.iter().product();
        let bytes = encode(dtype, &values(n, i as f32));
        out.push((OutputTensor::new(name, dtype, shape), bytes));
    }
    let ids: Vec<u8> = (0..4i64).flat_map(|i| i.to_le_bytes()).collect();
    out.push((
        OutputTensor::new("position_ids", Dtype::I64, vec![1, 4]),
        ids,
    ));
    out
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write_single(
    path: &Path,
    tensors: &[(OutputTensor, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) {
    let decl: Vec<OutputTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = SafetensorsWriter::create(path, &decl, metadata).unwrap();
    for (t, bytes) in tensors {
        w.write_tensor(&t.name, bytes).unwrap();
    }
    w.finish().unwrap();
}

fn write_dir(
    out: &Path,
    tensors: &[(OutputTensor, Vec<u8>)],
    max: Option<u64>,
    force: bool,
) -> PathBuf {
    let decl: Vec<OutputTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = ShardedWriter::create(out, decl, max, meta(&[("format", "pt")]), force).unwrap();
    for (t, bytes) in tensors {
        w.write_tensor(&t.name, bytes).unwrap();
    }
    w.finish().unwrap()
}

/// A file made of the given header JSON (unpadded) and `data`.
fn raw(path: &Path, header: impl AsRef<[u8]>, data: &[u8]) -> PathBuf {
    let header = header.as_ref();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn open_err(path: &Path) -> Error {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened, expected an error", path.display()),
        Err(e) => e,
    }
}

/// Everything observable about a checkpoint's tensors, for comparisons.
fn contents(c: &Checkpoint) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let mut out: Vec<_> = c
        .tensors()
        .iter()
        .map(|t| {
            let v = c.view(&t.name).unwrap();
            (t.name.clone(), t.dtype, t.shape.clone(), v.data.to_vec())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------- reading

#[test]
fn single_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let tensors = model();
    let metadata = meta(&[("format", "pt"), ("note", "quote \" and \\ and é")]);
    write_single(&path, &tensors, &metadata);

    // The header is padded so data starts 8-byte aligned.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(n % 8, 0);
    // The reference reader accepts it.
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(reference.len(), tensors.len());

    let c = Checkpoint::open(&path).unwrap();
    assert_eq!(c.root(), path);
    assert_eq!(c.dir(), dir.path());
    assert_eq!(c.metadata(), &metadata);
    assert_eq!(c.shard_paths(), vec![path.as_path()]);
    // Declared order is offset order.
    let names: Vec<&str> = c.tensors().iter().map(|t| t.name.as_str()).collect();
    let declared: Vec<&str> = tensors.iter().map(|(t, _)| t.name.as_str()).collect();
    assert_eq!(names, declared);
    let total: usize = tensors.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(c.total_bytes(), total as u64);

    for (i, (t, bytes)) in tensors.iter().enumerate() {
        let info = c.info(&t.name).unwrap();
        assert_eq!((info.dtype, &info.shape), (t.dtype, &t.shape));
        assert_eq!(info.nbytes(), bytes.len());
        let view = c.view(&t.name).unwrap();
        assert_eq!(view.data, bytes.as_slice());
        assert_eq!(view.numel(), info.numel());
        if t.dtype.is_float() {
            let expected = values(info.numel(), i as f32);
            assert_eq!(view.to_f32_vec(), expected, "{}", t.name);
            if info.numel() > 3 {
                let mut part = [0f32; 3];
                view.read_f32(1, &mut part);
                assert_eq!(part, expected[1..4]);
            }
        }
    }
    assert!(c.info("missing").is_none() && c.view("missing").is_none());

    let fp = &c.fingerprints()[0];
    assert_eq!(fp.path, path);
    assert_eq!(fp.size, bytes.len() as u64);
    assert_eq!(fp.header_sha256.len(), 64);
    assert!(fp.header_sha256.bytes().all(|b| b.is_ascii_hexdigit()));
    // Same header, same fingerprint hash.
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&path, &copy).unwrap();
    let c2 = Checkpoint::open(&copy).unwrap();
    assert_eq!(c2.fingerprints()[0].header_sha256, fp.header_sha256);
}

#[test]
fn empty_metadata_is_omitted_and_empty_model_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.safetensors");
    write_single(&path, &[], &BTreeMap::new());
    let bytes = std::fs::read(&path).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("__metadata__"));
    let c = Checkpoint::open(&path).unwrap();
    assert!(c.tensors().is_empty() && c.metadata().is_empty());
    assert_eq!(c.total_bytes(), 0);
}

#[test]
fn directory_layouts() {
    let dir = tempfile::tempdir().unwrap();
    // model.safetensors is preferred even beside other files.
    let d1 = dir.path().join("single");
    std::fs::create_dir(&d1).unwrap();
    write_single(&d1.join(SINGLE_FILE), &model(), &BTreeMap::new());
    write_single(
        &d1.join("other.safetensors"),
        &model()[..1],
        &BTreeMap::new(),
    );
    let c = Checkpoint::open(&d1).unwrap();
    assert_eq!(c.shard_paths(), vec![d1.join(SINGLE_FILE).as_path()]);
    assert_eq!(c.dir(), d1);
    assert_eq!(c.root(), d1);

    // Exactly one *.safetensors of another name is accepted.
    let d2 = dir.path().join("adapter");
    std::fs::create_dir(&d2).unwrap();
    write_single(
        &d2.join("adapter_model.safetensors"),
        &model(),
        &BTreeMap::new(),
    );
    std::fs::write(d2.join("training_args.bin"), b"pickle").unwrap();
    let c = Checkpoint::open(&d2).unwrap();
    assert_eq!(c.tensors().len(), model().len());

    // Several without an index are refused.
    write_single(
        &d2.join("second.safetensors"),
        &model()[..1],
        &BTreeMap::new(),
    );
    let e = open_err(&d2);
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(e.message().contains(INDEX_FILE), "{e}");
    assert!(e.message().contains("second.safetensors"), "{e}");
}

#[test]
fn sharded_output_equals_single_output() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = model();
    let single = write_dir(&dir.path().join("single"), &tensors, None, false);
    let sharded = write_dir(&dir.path().join("sharded"), &tensors, Some(300), false);

    assert_eq!(entries(&single), vec![SINGLE_FILE.to_string()]);
    let files = entries(&sharded);
    assert!(files.contains(&INDEX_FILE.to_string()));
    let shard_files: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert!(shard_files.len() >= 3, "{files:?}");
    let n = shard_files.len();
    assert_eq!(
        shard_files[0],
        &format!("model-00001-of-{n:05}.safetensors")
    );

    let a = Checkpoint::open(&single).unwrap();
    let b = Checkpoint::open(&sharded).unwrap();
    assert_eq!(b.shard_paths().len(), n);
    assert_eq!(contents(&a), contents(&b));
    assert_eq!(a.total_bytes(), b.total_bytes());
    assert_eq!(b.metadata(), &meta(&[("format", "pt")]));
    // Shards in order, each by offset: the declared order survives.
    let order: Vec<&str> = b.tensors().iter().map(|t| t.name.as_str()).collect();
    let declared: Vec<&str> = tensors.iter().map(|(t, _)| t.name.as_str()).collect();
    assert_eq!(order, declared);
    assert_eq!(b.fingerprints().len(), n);

    // The index as transformers writes it, and it opens directly too.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sharded.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], a.total_bytes());
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        tensors.len()
    );
    let c = Checkpoint::open(&sharded.join(INDEX_FILE)).unwrap();
    assert_eq!(contents(&c), contents(&a));
}

// ---------------------------------------------------------------- planning

#[test]
fn plan_shards_boundaries() {
    let t = |name: &str, n: usize| OutputTensor::new(name, Dtype::F32, vec![n]);
    // 40, 40, 20, 100, 40 bytes.
    let tensors = vec![t("a", 10), t("b", 10), t("c", 5), t("d", 25), t("e", 10)];
    let names = |plans: &[flatmerge::io::ShardPlan]| -> Vec<Vec<String>> {
        plans
            .iter()
            .map(|p| p.tensors.iter().map(|t| t.name.clone()).collect())
            .collect()
    };

    let one = ShardedWriter::plan_shards(&tensors, None);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].file_name, SINGLE_FILE);
    assert_eq!(one[0].bytes, 240);

    // Exactly full (40 + 40 + 20 = 100) stays together; the big tensor is alone.
    let plans = ShardedWriter::plan_shards(&tensors, Some(100));
    assert_eq!(
        names(&plans),
        vec![vec!["a", "b", "c"], vec!["d"], vec!["e"]]
    );
    assert_eq!(
        plans.iter().map(|p| p.bytes).collect::<Vec<_>>(),
        vec![100, 100, 40]
    );
    assert_eq!(plans[0].file_name, "model-00001-of-00003.safetensors");
    assert_eq!(plans[2].file_name, "model-00003-of-00003.safetensors");

    // One byte less splits before `c`; a tensor over the limit gets its own shard.
    let plans = ShardedWriter::plan_shards(&tensors, Some(99));
    assert_eq!(
        names(&plans),
        vec![vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]
    );
    let plans = ShardedWriter::plan_shards(&tensors, Some(30));
    assert_eq!(plans.len(), 5);
    assert!(plans.iter().all(|p| p.tensors.len() == 1));

    // Large enough for all: one file.
    assert_eq!(ShardedWriter::plan_shards(&tensors, Some(1 << 40)).len(), 1);
    // No tensors: one empty model.safetensors.
    let empty = ShardedWriter::plan_shards(&[], Some(10));
    assert_eq!(empty.len(), 1);
    assert!(empty[0].tensors.is_empty());
    assert_eq!(empty[0].file_name, SINGLE_FILE);
}

// ---------------------------------------------------------------- errors on reading

#[test]
fn missing_path_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(&dir.path().join("nope"));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.file(), Some(dir.path().join("nope").as_path()));
    // An empty directory holds nothing usable.
    let e = open_err(dir.path());
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.file(), Some(dir.path()));
}

#[test]
fn pickles_are_refused_with_conversion_advice() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::write(&bin, b"\x80\x02pickle").unwrap();
    let e = open_err(&bin);
    assert_eq!(e.kind(), ErrorKind::Pickle);
    assert!(e.message().contains("safe_serialization=True"), "{e}");
    assert_eq!(e.file(), Some(bin.as_path()));

    let shards = dir.path().join("owl");
    std::fs::create_dir(&shards).unwrap();
    std::fs::write(shards.join("pytorch_model-00001-of-00002.bin"), b"x").unwrap();
    std::fs::write(shards.join("pytorch_model-00002-of-00002.bin"), b"x").unwrap();
    std::fs::write(shards.join("pytorch_model.bin.index.json"), b"{}").unwrap();
    std::fs::write(shards.join("config.json"), b"{}").unwrap();
    let e = open_err(&shards);
    assert_eq!(e.kind(), ErrorKind::Pickle);
    assert!(
        e.message().contains("pytorch_model-00001-of-00002.bin"),
        "{e}"
    );
    assert!(e.message().contains("save_pretrained"), "{e}");
    for name in ["weights.pt", "weights.pth", "pytorch_model.bin.index.json"] {
        std::fs::write(dir.path().join(name), b"x").unwrap();
        assert_eq!(
            open_err(&dir.path().join(name)).kind(),
            ErrorKind::Pickle,
            "{name}"
        );
    }
}

const GOOD: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}"#;

fn assert_format(path: &Path, tensor: Option<&str>, needle: &str) {
    let e = open_err(path);
    assert_eq!(e.kind(), ErrorKind::Format, "{e}");
    assert_eq!(e.file(), Some(path), "{e}");
    assert_eq!(e.tensor(), tensor, "{e}");
    assert!(e.message().contains(needle), "`{needle}` not in: {e}");
}

#[test]
fn good_raw_file_opens() {
    let dir = tempfile::tempdir().unwrap();
    // Unpadded header (older writers): alignment is not required to read.
    let p = raw(&dir.path().join("x.safetensors"), GOOD, &[0; 12]);
    let c = Checkpoint::open(&p).unwrap();
    assert_eq!(c.tensors().len(), 2);
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.safetensors");
    std::fs::write(&p, [1u8, 0, 0]).unwrap();
    assert_format(&p, None, "truncated");
    let p = dir.path().join("empty.safetensors");
    std::fs::write(&p, []).unwrap();
    assert_format(&p, None, "truncated");
    // Data cut short: the last tensor runs past the end.
    let p = raw(&dir.path().join("cut.safetensors"), GOOD, &[0; 10]);
    assert_format(&p, Some("b"), "past the end");
}

#[test]
fn header_length_checks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("long.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, &bytes).unwrap();
    assert_format(&p, None, "truncated: the header length says 1000");

    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, &bytes).unwrap();
    assert_format(&p, None, "100 MB");

    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, &bytes).unwrap();
    assert_format(&p, None, "100 MB");
}

#[test]
fn malformed_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw(
        &dir.path().join("j.safetensors"),
        r#"{"a": {"dtype": "F32""#,
        &[],
    );
    assert_format(&p, None, "not valid JSON");
    let p = raw(&dir.path().join("k.safetensors"), "[1, 2]", &[]);
    assert_format(&p, None, "not valid JSON");
    let p = raw(&dir.path().join("u.safetensors"), b"{\"\xff\": 1}", &[]);
    assert_format(&p, None, "not valid JSON");
    // Entry fields of the wrong type name the tensor.
    let p = raw(
        &dir.path().join("s.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "`shape`");
    let p = raw(
        &dir.path().join("o.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "`data_offsets`");
    // A duplicate field inside an entry is caught by the reference reader.
    let p = raw(
        &dir.path().join("f.safetensors"),
        r#"{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_format(&p, None, "rejected by the safetensors reader");
}

#[test]
fn duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw(
        &dir.path().join("d.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "twice");
    let p = raw(
        &dir.path().join("m.safetensors"),
        r#"{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    assert_format(&p, None, "`k` twice");
    let p = raw(
        &dir.path().join("n.safetensors"),
        r#"{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    assert_format(&p, None, "not a string");
}

#[test]
fn unknown_dtype_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["F4", "Q4_K"] {
        let header = format!(
            r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"w":{{"dtype":"{dtype}","shape":[2],"data_offsets":[4,5]}}}}"#
        );
        let p = raw(
            &dir.path().join(format!("{dtype}.safetensors")),
            &header,
            &[0; 5],
        );
        let e = open_err(&p);
        assert_eq!(e.kind(), ErrorKind::UnsupportedDtype, "{e}");
        assert_eq!(e.tensor(), Some("w"));
        assert_eq!(e.file(), Some(p.as_path()));
        assert!(e.message().contains(&format!("`{dtype}`")), "{e}");
    }
}

#[test]
fn shape_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw(
        &dir.path().join("s.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "needs 12 bytes");
    let p = raw(
        &dir.path().join("o.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "overflows");
    let p = raw(
        &dir.path().join("r.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
        &[0; 8],
    );
    assert_format(&p, Some("a"), "end before");
}

#[test]
fn offsets_must_tile_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw(
        &dir.path().join("overlap.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    );
    assert_format(&p, Some("b"), "overlap those of `a`");
    let p = raw(
        &dir.path().join("gap.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        &[0; 12],
    );
    assert_format(&p, Some("b"), "belong to no tensor");
    let p = raw(&dir.path().join("tail.safetensors"), GOOD, &[0; 16]);
    assert_format(&p, None, "4 bytes at the end");
}

/// Two shards and an index, as (dir, shard paths).
fn sharded_fixture(root: &Path) -> (PathBuf, [PathBuf; 2]) {
    let d = root.join("sharded");
    std::fs::create_dir(&d).unwrap();
    let t = |name: &str| (OutputTensor::new(name, Dtype::F32, vec![2]), vec![0u8; 8]);
    let s1 = d.join("model-00001-of-00002.safetensors");
    let s2 = d.join("model-00002-of-00002.safetensors");
    write_single(&s1, &[t("a"), t("b")], &BTreeMap::new());
    write_single(&s2, &[t("c")], &BTreeMap::new());
    (d, [s1, s2])
}

fn write_index(dir: &Path, weight_map: &str) -> PathBuf {
    let p = dir.join(INDEX_FILE);
    std::fs::write(
        &p,
        format!(r#"{{"metadata":{{"total_size":24}},"weight_map":{{{weight_map}}}}}"#),
    )
    .unwrap();
    p
}

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

#[test]
fn index_consistency() {
    let root = tempfile::tempdir().unwrap();
    let (d, [_s1, s2]) = sharded_fixture(root.path());

    let good = format!(r#""a":"{S1}","b":"{S1}","c":"{S2}""#);
    write_index(&d, &good);
    let c = Checkpoint::open(&d).unwrap();
    assert_eq!(c.tensors().len(), 3);
    assert_eq!(c.dir(), d);

    // A shard the index names is missing.
    let idx = write_index(
        &d,
        &format!(r#""a":"{S1}","b":"{S1}","c":"model-00003.safetensors""#),
    );
    let e = open_err(&d);
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(e.file(), Some(d.join("model-00003.safetensors").as_path()));
    assert!(e.message().contains("`c`"), "{e}");

    // A tensor in the wrong shard.
    write_index(&d, &format!(r#""a":"{S1}","b":"{S2}","c":"{S2}""#));
    assert_format(&idx, Some("b"), &format!("but it is in `{S1}`"));

    // A tensor of a shard missing from the index.
    write_index(&d, &format!(r#""a":"{S1}","c":"{S2}""#));
    let e = open_err(&d);
    assert_eq!(
        (e.kind(), e.tensor()),
        (ErrorKind::Format, Some("b")),
        "{e}"
    );
    assert!(e.message().contains("missing from"), "{e}");

    // An index entry its shard does not hold.
    write_index(
        &d,
        &format!(r#""a":"{S1}","b":"{S1}","c":"{S2}","z":"{S2}""#),
    );
    assert_format(&idx, Some("z"), "does not contain it");

    // Listed twice; a path escaping the directory; not JSON.
    write_index(
        &d,
        &format!(r#""a":"{S1}","a":"{S1}","b":"{S1}","c":"{S2}""#),
    );
    assert_format(&idx, Some("a"), "twice");
    write_index(&d, &format!(r#""a":"../{S1}","b":"{S1}","c":"{S2}""#));
    assert_format(&idx, Some("a"), "not a file name");
    std::fs::write(&idx, b"{\"weight_map\": [").unwrap();
    assert_format(&idx, None, "not a valid safetensors index");

    // The same tensor in two shards.
    write_single(
        &s2,
        &[
            (OutputTensor::new("c", Dtype::F32, vec![2]), vec![0u8; 8]),
            (OutputTensor::new("a", Dtype::F32, vec![2]), vec![0u8; 8]),
        ],
        &BTreeMap::new(),
    );
    write_index(&d, &format!(r#""a":"{S1}","b":"{S1}","c":"{S2}""#));
    let e = open_err(&d);
    assert_eq!(
        (e.kind(), e.tensor()),
        (ErrorKind::Format, Some("a")),
        "{e}"
    );
    assert_eq!(e.file(), Some(s2.as_path()));
    assert!(e.message().contains("also in shard"), "{e}");
}

#[test]
fn a_bad_shard_names_the_shard() {
    let root = tempfile::tempdir().unwrap();
    let (d, [_s1, s2]) = sharded_fixture(root.path());
    write_index(&d, &format!(r#""a":"{S1}","b":"{S1}","c":"{S2}""#));
    std::fs::write(&s2, [0u8; 4]).unwrap();
    let e = open_err(&d);
    assert_eq!(e.kind(), ErrorKind::Format);
    assert_eq!(e.file(), Some(s2.as_path()));
}

// ---------------------------------------------------------------- writing

#[test]
fn writer_rejects_wrong_order_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let decl = vec![
        OutputTensor::new("a", Dtype::F32, vec![2]),
        OutputTensor::new("b", Dtype::BF16, vec![3]),
    ];
    let mut w = SafetensorsWriter::create(&path, &decl, &BTreeMap::new()).unwrap();
    let e = w.write_tensor("b", &[0; 6]).unwrap_err();
    assert_eq!((e.kind(), e.tensor()), (ErrorKind::InvalidInput, Some("b")));
    assert!(e.message().contains("next declared tensor is `a`"), "{e}");
    let e = w.write_tensor("a", &[0; 7]).unwrap_err();
    assert!(e.message().contains("declares 8"), "{e}");
    // Errors leave the writer usable.
    w.write_tensor("a", &[0; 8]).unwrap();
    let e = SafetensorsWriter::finish(w).unwrap_err();
    assert_eq!(e.tensor(), Some("b"));

    let mut w = SafetensorsWriter::create(&path, &decl, &BTreeMap::new()).unwrap();
    w.write_tensor("a", &[0; 8]).unwrap();
    w.write_tensor("b", &[0; 6]).unwrap();
    assert!(w
        .write_tensor("c", &[])
        .unwrap_err()
        .message()
        .contains("already written"));
    w.finish().unwrap();

    // Declarations are checked.
    let dup = vec![decl[0].clone(), decl[0].clone()];
    let e = SafetensorsWriter::create(&path, &dup, &BTreeMap::new()).unwrap_err();
    assert_eq!((e.kind(), e.tensor()), (ErrorKind::InvalidInput, Some("a")));
    let reserved = vec![OutputTensor::new("__metadata__", Dtype::F32, vec![1])];
    assert!(SafetensorsWriter::create(&path, &reserved, &BTreeMap::new()).is_err());
    let huge = vec![OutputTensor::new("h", Dtype::F64, vec![usize::MAX, 4])];
    assert!(SafetensorsWriter::create(&path, &huge, &BTreeMap::new()).is_err());
}

#[test]
fn sharded_writer_errors_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tensors = model();
    let decl: Vec<OutputTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = ShardedWriter::create(&out, decl, Some(300), BTreeMap::new(), false).unwrap();
    assert!(w.shards().len() > 1);
    let e = w
        .write_tensor(&tensors[1].0.name, &tensors[1].1)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    w.write_tensor(&tensors[0].0.name, &tensors[0].1).unwrap();
    let e = w.finish().unwrap_err();
    assert_eq!(e.tensor(), Some(tensors[1].0.name.as_str()));
    // The failed finish removed the temporary directory and made no output.
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn drop_without_finish_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tensors = model();
    let decl: Vec<OutputTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = ShardedWriter::create(&out, decl, Some(200), BTreeMap::new(), false).unwrap();
    let temp = w.temp_dir().to_path_buf();
    assert!(temp.is_dir());
    assert!(temp
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".out.tmp-"));
    for (t, bytes) in &tensors[..3] {
        w.write_tensor(&t.name, bytes).unwrap();
    }
    w.write_file("merge_report.json", b"{}").unwrap();
    drop(w);
    assert!(!temp.exists() && !out.exists());
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn output_exists_and_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested").join("out");
    let first = model();
    write_dir(&out, &first, None, false);

    // Without force: refused, before and at finish.
    let decl: Vec<OutputTensor> = first.iter().map(|(t, _)| t.clone()).collect();
    let e = ShardedWriter::create(&out, decl.clone(), None, BTreeMap::new(), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutputExists);
    assert_eq!(e.file(), Some(out.as_path()));

    // With force: the old output stays until finish, then is replaced.
    let second = &model()[..2];
    let decl2: Vec<OutputTensor> = second.iter().map(|(t, _)| t.clone()).collect();
    let mut w = ShardedWriter::create(&out, decl2, Some(300), BTreeMap::new(), true).unwrap();
    for (t, bytes) in second {
        w.write_tensor(&t.name, bytes).unwrap();
    }
    w.copy_file(&out.join(SINGLE_FILE), "old.bin").unwrap();
    assert_eq!(Checkpoint::open(&out).unwrap().tensors().len(), first.len());
    assert_eq!(w.finish().unwrap(), out);
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.tensors().len(), 2);
    assert!(out.join("old.bin").is_file());
    // Neither temporary nor old copies are left beside it.
    assert_eq!(entries(out.parent().unwrap()), vec!["out".to_string()]);

    // A directory that does not hold a model is never replaced.
    let precious = dir.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("thesis.tex"), b"...").unwrap();
    let e =
        ShardedWriter::create(&precious, decl.clone(), None, BTreeMap::new(), true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutputExists);
    assert!(precious.join("thesis.tex").is_file());
    // Nor is a file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = ShardedWriter::create(&file, decl.clone(), None, BTreeMap::new(), true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutputExists);
    // An empty directory is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write_dir(&empty, &first, None, true);
    assert_eq!(
        Checkpoint::open(&empty).unwrap().tensors().len(),
        first.len()
    );
}

#[test]
fn extra_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("config.json");
    std::fs::write(&src, b"{\"hidden_size\": 8}").unwrap();
    let out = dir.path().join("out");
    let mut w = ShardedWriter::create(&out, vec![], None, BTreeMap::new(), false).unwrap();
    w.copy_file(&src, "config.json").unwrap();
    w.write_file("merge_report.json", b"{\"ok\":true}").unwrap();
    for bad in ["config.json", SINGLE_FILE, INDEX_FILE, "../x", "a/b", ""] {
        let e = w.write_file(bad, b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
    }
    let e = w
        .copy_file(&dir.path().join("missing.json"), "tokenizer.json")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    w.finish().unwrap();
    assert_eq!(
        entries(&out),
        vec!["config.json", "merge_report.json", SINGLE_FILE]
    );
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    let c = Checkpoint::open(&out).unwrap();
    assert!(c.tensors().is_empty());
    // transformers needs `format` in every shard's metadata.
    assert_eq!(c.metadata(), &meta(&[("format", "pt")]));
}

#[test]
fn checkpoints_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Checkpoint>();
    send_sync::<flatmerge::io::TensorView<'static>>();
    send_sync::<ShardedWriter>();
}

#[test]
fn write_atomically_publishes_only_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file.json");
    write_atomically(&path, |tmp| {
        assert_ne!(tmp, path);
        std::fs::write(tmp, b"one").map_err(|e| Error::io(tmp, e))
    })
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    let e = write_atomically(&path, |tmp| {
        std::fs::write(tmp, b"two").unwrap();
        Err(Error::new(ErrorKind::Cancelled, "stop"))
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    assert_eq!(entries(dir.path()), vec!["file.json"]);
}

// ---------------------------------------------------------------- statistics

fn sample_stats() -> ActivationStats {
    let mut stats = ActivationStats::new("llava-1.5-7b (tiny)", "probe: 3 captions");
    stats.examples = 3;
    stats.modality = Some(vec![0, 1, 1]);
    stats.layers.insert(
        "model.layers.0.mlp.up_proj".into(),
        LayerStats {
            x_mean: Some(values(4, 1.0)),
            y_mean: Some(values(6, 2.0)),
            count: Some(123),
            x_rows: Some(Rows {
                rows: 3,
                width: 4,
                data: values(12, 3.0),
            }),
            y_rows: Some(Rows {
                rows: 3,
                width: 6,
                data: values(18, 4.0),
            }),
            x_gram: None,
        },
    );
    stats.layers.insert(
        "model.layers.0.self_attn.q_proj".into(),
        LayerStats {
            x_mean: Some(values(4, 5.0)),
            y_mean: Some(values(4, 6.0)),
            count: Some(1),
            ..LayerStats::default()
        },
    );
    stats
}

#[test]
fn stats_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.stats.safetensors");
    let stats = sample_stats();
    stats.save(&path).unwrap();
    assert_eq!(entries(dir.path()), vec!["a.stats.safetensors"]);
    let back = ActivationStats::load(&path).unwrap();
    assert_eq!(back, stats);
    assert_eq!(
        back.layer("model.layers.0.mlp.up_proj").unwrap().count,
        Some(123)
    );
    assert!(back.layer("model.layers.0.mlp").is_none());
    // The file is plain safetensors with the SPEC's metadata and dtypes.
    let c = Checkpoint::open(&path).unwrap();
    assert_eq!(c.metadata()["format"], "flatmerge.activations");
    assert_eq!(c.metadata()["version"], "1");
    assert_eq!(c.metadata()["examples"], "3");
    assert_eq!(
        c.info("model.layers.0.mlp.up_proj.count").unwrap().dtype,
        Dtype::I64
    );
    assert_eq!(c.info("probe.modality").unwrap().shape, vec![3]);

    // Empty statistics round-trip too.
    let empty = ActivationStats::new("m", "p");
    empty.save(&path).unwrap();
    assert_eq!(ActivationStats::load(&path).unwrap(), empty);
}

/// Writes a statistics-shaped file with the given tensors and metadata.
fn stats_file(
    path: &Path,
    metadata: &[(&str, &str)],
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
) {
    let decl: Vec<OutputTensor> = tensors
        .iter()
        .map(|(n, d, s, _)| OutputTensor::new(*n, *d, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &decl, &meta(metadata)).unwrap();
    for (n, _, _, bytes) in tensors {
        w.write_tensor(n, bytes).unwrap();
    }
    w.finish().unwrap();
}

const META: &[(&str, &str)] = &[
    ("format", "flatmerge.activations"),
    ("version", "1"),
    ("examples", "2"),
];

#[test]
fn stats_bf16_rows_load_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let rows = values(6, 0.0);
    stats_file(
        &path,
        META,
        &[
            (
                "l.x_mean",
                Dtype::F32,
                vec![3],
                encode(Dtype::F32, &values(3, 1.0)),
            ),
            (
                "l.x_rows",
                Dtype::BF16,
                vec![2, 3],
                encode(Dtype::BF16, &rows),
            ),
            ("l.count", Dtype::I64, vec![1], 7i64.to_le_bytes().to_vec()),
        ],
    );
    let stats = ActivationStats::load(&path).unwrap();
    let l = stats.layer("l").unwrap();
    assert_eq!(l.x_rows.as_ref().unwrap().data, rows);
    assert_eq!(l.x_rows.as_ref().unwrap().row(1), &rows[3..]);
    assert_eq!(l.count, Some(7));
    assert_eq!(stats.model, "");
}

fn stats_err(path: &Path) -> Error {
    let e = ActivationStats::load(path).unwrap_err();
    assert_eq!(e.file(), Some(path), "{e}");
    e
}

#[test]
fn stats_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let mean = |n: usize| encode(Dtype::F32, &values(n, 0.0));
    let check = |metadata: &[(&str, &str)],
                 tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
                 tensor: Option<&str>,
                 needle: &str| {
        stats_file(&path, metadata, tensors);
        let e = stats_err(&path);
        assert_eq!(e.kind(), ErrorKind::Stats, "{e}");
        assert_eq!(e.tensor(), tensor, "{e}");
        assert!(e.message().contains(needle), "`{needle}` not in: {e}");
    };
    let x = ("l.x_mean", Dtype::F32, vec![3], mean(3));
    let only_x = std::slice::from_ref(&x);

    check(
        &[("format", "pt")],
        only_x,
        None,
        "not an activation statistics file",
    );
    check(&[], only_x, None, "no `format`");
    check(
        &[
            ("format", "flatmerge.activations"),
            ("version", "3"),
            ("examples", "2"),
        ],
        only_x,
        None,
        "version `3`",
    );
    check(
        &[("format", "flatmerge.activations"), ("version", "1")],
        only_x,
        None,
        "`examples`",
    );
    check(
        META,
        &[("l.z_mean", Dtype::F32, vec![3], mean(3))],
        Some("l.z_mean"),
        "not a statistics tensor",
    );
    check(
        META,
        &[("weights", Dtype::F32, vec![3], mean(3))],
        Some("weights"),
        "not a statistics tensor",
    );
    check(
        META,
        &[("l.x_mean", Dtype::F16, vec![2], vec![0; 4])],
        Some("l.x_mean"),
        "F32 of rank 1",
    );
    check(
        META,
        &[("l.x_mean", Dtype::F32, vec![1, 3], mean(3))],
        Some("l.x_mean"),
        "F32 of rank 1",
    );
    check(
        META,
        &[("l.count", Dtype::I64, vec![2], vec![1; 16])],
        Some("l.count"),
        "I64 of shape [1]",
    );
    check(
        META,
        &[("l.count", Dtype::I32, vec![1], vec![1; 4])],
        Some("l.count"),
        "I64 of shape [1]",
    );
    check(
        META,
        &[("l.count", Dtype::I64, vec![1], 0i64.to_le_bytes().to_vec())],
        Some("l.count"),
        "at least 1",
    );
    check(
        META,
        &[(
            "l.count",
            Dtype::I64,
            vec![1],
            (-5i64).to_le_bytes().to_vec(),
        )],
        Some("l.count"),
        "at least 1",
    );
    check(
        META,
        &[("l.x_rows", Dtype::F16, vec![2, 3], vec![0; 12])],
        Some("l.x_rows"),
        "F32 or BF16",
    );
    check(
        META,
        &[("l.x_rows", Dtype::F32, vec![6], mean(6))],
        Some("l.x_rows"),
        "rank 2",
    );
    check(
        META,
        &[("l.x_rows", Dtype::F32, vec![3, 2], mean(6))],
        Some("l.x_rows"),
        "2 examples",
    );
    check(
        META,
        &[x.clone(), ("l.x_rows", Dtype::F32, vec![2, 4], mean(8))],
        Some("l.x_rows"),
        "has length 3",
    );
    check(
        META,
        &[("probe.modality", Dtype::U8, vec![3], vec![0; 3])],
        Some("probe.modality"),
        "2 examples",
    );
    check(
        META,
        &[("probe.modality", Dtype::I8, vec![2], vec![0; 2])],
        Some("probe.modality"),
        "U8",
    );
    check(
        META,
        &[(
            "l.y_mean",
            Dtype::F32,
            vec![2],
            encode(Dtype::F32, &[1.0, f32::NAN]),
        )],
        Some("l.y_mean"),
        "NaN",
    );

    // A file that is not safetensors at all is a statistics error; a missing
    // one keeps its kind.
    std::fs::write(&path, b"garbage!garbage!").unwrap();
    assert_eq!(stats_err(&path).kind(), ErrorKind::Stats);
    let missing = dir.path().join("missing.safetensors");
    assert_eq!(stats_err(&missing).kind(), ErrorKind::NotFound);
}

#[test]
fn stats_save_refuses_inconsistent_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let bad = |f: &dyn Fn(&mut ActivationStats), tensor: &str| {
        let mut stats = sample_stats();
        f(&mut stats);
        let e = stats.save(&path).unwrap_err();
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::Stats, Some(tensor)),
            "{e}"
        );
        assert!(!path.exists());
        assert!(entries(dir.path()).is_empty());
    };
    let up = "model.layers.0.mlp.up_proj";
    bad(
        &|s| {
            s.examples = 4;
            s.modality = None;
        },
        &format!("{up}.x_rows"),
    );
    bad(
        &|s| s.layers.get_mut(up).unwrap().count = Some(0),
        &format!("{up}.count"),
    );
    bad(
        &|s| s.layers.get_mut(up).unwrap().count = Some(u64::MAX),
        &format!("{up}.count"),
    );
    bad(
        &|s| {
            s.layers
                .get_mut(up)
                .unwrap()
                .y_rows
                .as_mut()
                .unwrap()
                .data
                .pop()
                .map(drop)
                .unwrap_or(())
        },
        &format!("{up}.y_rows"),
    );
    bad(&|s| s.modality = Some(vec![0]), "probe.modality");
    bad(
        &|s| drop(s.layers.insert("empty".into(), LayerStats::default())),
        "empty",
    );
}

#[test]
fn a_file_changed_after_opening_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_single(&path, &model(), &BTreeMap::new());
    let checkpoint = Checkpoint::open(&path).unwrap();
    checkpoint.check_unchanged().unwrap();
    // A rewrite shows as a new modification time (set explicitly: two writes
    // within the file system's time resolution could share one).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    let e = checkpoint.check_unchanged().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(e.file(), Some(path.as_path()));
    assert!(
        e.to_string().contains("changed while it was being read"),
        "{e}"
    );
}

#[test]
fn atomic_write_errors_name_the_target_not_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing-dir").join("x.stats.safetensors");
    let e = ActivationStats::new("m", "p").save(&target).unwrap_err();
    assert_eq!(e.file(), Some(target.as_path()), "{e}");
    assert!(!e.to_string().contains(".tmp-"), "{e}");
}

#[test]
fn stats_non_finite_values_anywhere_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let ok = |n: usize| encode(Dtype::F32, &values(n, 0.0));
    let with = |n: usize, at: usize, v: f32, dtype: Dtype| {
        let mut x = values(n, 0.0);
        x[at] = v;
        encode(dtype, &x)
    };
    for (tensor, entry) in [
        (
            "l.x_mean",
            (
                "l.x_mean",
                Dtype::F32,
                vec![3],
                with(3, 2, f32::INFINITY, Dtype::F32),
            ),
        ),
        (
            "l.y_mean",
            (
                "l.y_mean",
                Dtype::F32,
                vec![3],
                with(3, 0, f32::NEG_INFINITY, Dtype::F32),
            ),
        ),
        (
            "l.x_rows",
            (
                "l.x_rows",
                Dtype::F32,
                vec![2, 3],
                with(6, 4, f32::NAN, Dtype::F32),
            ),
        ),
        (
            "l.y_rows",
            (
                "l.y_rows",
                Dtype::BF16,
                vec![2, 3],
                with(6, 5, f32::INFINITY, Dtype::BF16),
            ),
        ),
    ] {
        let mean = if tensor.starts_with("l.x") {
            "l.x_mean"
        } else {
            "l.y_mean"
        };
        let mut tensors = vec![entry];
        if !tensor.ends_with("mean") {
            tensors.insert(0, (mean, Dtype::F32, vec![3], ok(3)));
        }
        stats_file(&path, META, &tensors);
        let e = stats_err(&path);
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::Stats, Some(tensor)),
            "{e}"
        );
        assert!(e.message().contains("NaN or infinite"), "{e}");
    }
}

#[test]
fn stats_examples_must_be_a_non_negative_integer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let x = (
        "l.x_mean",
        Dtype::F32,
        vec![3],
        encode(Dtype::F32, &values(3, 0.0)),
    );
    for examples in ["two", "-1", "1.5", ""] {
        stats_file(
            &path,
            &[
                ("format", "flatmerge.activations"),
                ("version", "1"),
                ("examples", examples),
            ],
            std::slice::from_ref(&x),
        );
        let e = stats_err(&path);
        assert_eq!(
            (e.kind(), e.tensor()),
            (ErrorKind::Stats, None),
            "{examples}: {e}"
        );
        assert!(e.message().contains("`examples`"), "{examples}: {e}");
    }
}

#[test]
fn several_safetensors_files_without_an_index_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["adapter.safetensors", "extra.safetensors"] {
        write_single(&dir.path().join(name), &model(), &BTreeMap::new());
    }
    let e = open_err(dir.path());
    assert_eq!(
        (e.kind(), e.file()),
        (ErrorKind::Format, Some(dir.path())),
        "{e}"
    );
    assert!(
        e.message()
            .contains("2 safetensors files (adapter.safetensors, extra.safetensors)")
            && e.message()
                .contains("add the index, or pass the one file to use"),
        "{e}"
    );
}
