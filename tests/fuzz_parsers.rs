//! Fuzzing that runs in CI: proptest feeds random bytes, mutated seed files
//! (the cargo-fuzz seeds in `fuzz/seeds/<target>/`) and randomly assembled
//! safetensors headers to each input parser — the safetensors reader, the
//! shard index, statistics files and merge configs — and checks that none
//! panics and that every error names the file it read. The inputs under
//! `tests/fuzz_regressions/<target>/` (findings of the cargo-fuzz runs and
//! hand-picked hostile inputs) are replayed the same way.
//!
//! The coverage-guided fuzzers themselves: `scripts/fuzz.sh`, `fuzz/`.

use flatmerge::config::MergeConfig;
use flatmerge::dtype::Dtype;
use flatmerge::io::{Checkpoint, OutputTensor, SafetensorsWriter, INDEX_FILE};
use flatmerge::stats::ActivationStats;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The four parsers, as the fuzz targets of the same names run them.
#[derive(Debug, Clone, Copy)]
enum Target {
    SafetensorsHeader,
    IndexJson,
    StatsFile,
    ConfigYaml,
}

const TARGETS: [Target; 4] = [
    Target::SafetensorsHeader,
    Target::IndexJson,
    Target::StatsFile,
    Target::ConfigYaml,
];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::SafetensorsHeader => "safetensors_header",
            Target::IndexJson => "index_json",
            Target::StatsFile => "stats_file",
            Target::ConfigYaml => "config_yaml",
        }
    }

    /// Files of `root/<target>/`, sorted, as (name, bytes).
    fn files_under(self, root: &Path) -> Vec<(String, Vec<u8>)> {
        let dir = root.join(self.name());
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .map(|p| {
                let bytes = std::fs::read(&p).expect("read a fuzz input");
                (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        files.sort();
        files
    }

    fn seeds(self) -> Vec<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let seeds: Vec<Vec<u8>> = self
            .files_under(&root)
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        assert!(!seeds.is_empty(), "no seeds for {}", self.name());
        seeds
    }

    /// Parses `bytes` the way the fuzz target does, in `dir` (which, for
    /// the index, holds the two shards of [`sharded_dir`]); whether it was
    /// accepted. Panics — the finding — when an error names no file or a
    /// file outside `dir`.
    fn run(self, dir: &Path, bytes: &[u8]) -> bool {
        let (input, result): (PathBuf, flatmerge::Result<()>) = match self {
            Target::SafetensorsHeader => {
                let path = write(dir, "model.safetensors", bytes);
                let result = Checkpoint::open_file(&path).map(|c| {
                    for info in c.tensors() {
                        let view = c.view(&info.name).expect("a listed tensor has a view");
                        assert_eq!(view.data.len(), info.nbytes());
                        if info.dtype.is_float() {
                            let _ = view.to_f32_vec();
                        }
                    }
                });
                (path, result)
            }
            Target::IndexJson => {
                write(dir, INDEX_FILE, bytes);
                (dir.to_path_buf(), Checkpoint::open(dir).map(drop))
            }
            Target::StatsFile => {
                let path = write(dir, "a.stats.safetensors", bytes);
                let result = ActivationStats::load(&path).map(|stats| {
                    for layer in stats.layers.values() {
                        assert!(layer.count.is_none_or(|c| c >= 1));
                        let means = layer.x_mean.iter().chain(&layer.y_mean).flatten();
                        assert!(means.clone().all(|v| v.is_finite()));
                    }
                });
                (path, result)
            }
            Target::ConfigYaml => {
                let path = write(dir, "merge.yaml", bytes);
                (path.clone(), MergeConfig::from_file(&path).map(drop))
            }
        };
        if let Err(e) = &result {
            let file = e
                .file()
                .unwrap_or_else(|| panic!("{}: error without a file: {e}", self.name()));
            assert!(
                file == input || file.starts_with(dir),
                "{}: error names {} rather than the input: {e}",
                self.name(),
                file.display()
            );
        }
        result.is_ok()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write a fuzz input");
    path
}

/// A directory holding the shards the index target's inputs refer to:
/// `a.safetensors` with `x`, `b.safetensors` with `y` (as in the fuzz target).
fn sharded_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (file, name) in [("a.safetensors", "x"), ("b.safetensors", "y")] {
        let tensors = [OutputTensor::new(name, Dtype::F32, vec![2])];
        let mut w = SafetensorsWriter::create(&dir.path().join(file), &tensors, &BTreeMap::new())
            .expect("create a shard");
        w.write_tensor(name, &[0u8; 8]).expect("write a shard");
        w.finish().expect("finish a shard");
    }
    dir
}

/// One mutation of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Repeat(usize, usize),
}

/// Bytes that matter to JSON, YAML and little-endian integers.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        prop::sample::select(b"\x00\xff\x7f\x80\"{}[]:,-.0123456789eE \n\t#&*!|>'\\".to_vec()),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..=255).prop_map(|(i, m)| Edit::Flip(i, m)),
        (at, interesting_byte()).prop_map(|(i, b)| Edit::Set(i, b)),
        at.prop_map(Edit::Truncate),
        (at, prop::collection::vec(interesting_byte(), 1..12))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (at, 1usize..16).prop_map(|(i, n)| Edit::Remove(i, n)),
        (at, 1usize..24).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        let pos = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match edit {
            Edit::Flip(i, m) if len > 0 => bytes[i % len] ^= m,
            Edit::Set(i, b) if len > 0 => bytes[i % len] = *b,
            Edit::Truncate(i) => bytes.truncate(pos(*i)),
            Edit::Insert(i, b) => {
                let at = pos(*i);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Remove(i, n) if len > 0 => {
                let at = i % len;
                bytes.drain(at..(at + n).min(len));
            }
            Edit::Repeat(i, n) if len > 0 => {
                let at = i % len;
                let piece: Vec<u8> = bytes[at..(at + n).min(len)].to_vec();
                bytes.splice(at..at, piece);
            }
            _ => {}
        }
    }
    bytes
}

/// A safetensors file assembled from random parts: entries whose names,
/// dtypes, shapes and offsets are each plausible but need not agree, a
/// header length that may lie, and a data section of random size.
fn assembled_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let name = prop::sample::select(vec!["w", "b", "__metadata__", "w.x_mean", "l.count", ""]);
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "Q4", "f32",
    ]);
    let shape = prop::collection::vec(prop_oneof![0u64..5, Just(u64::MAX), Just(1 << 62)], 0..4);
    let offsets = (0u64..64, 0u64..64);
    let entry = (name, dtype, shape, offsets, any::<bool>());
    (
        prop::collection::vec(entry, 0..5),
        0usize..80,
        prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    )
        .prop_map(|(entries, data_len, lie)| {
            let mut json = String::from("{");
            for (i, (name, dtype, shape, (begin, end), consistent)) in entries.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                let (begin, end) = if *consistent {
                    let size = shape.iter().fold(4u64, |a, d| a.saturating_mul(*d));
                    (*begin, begin.saturating_add(size))
                } else {
                    (*begin, *end)
                };
                let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
                json.push_str(&format!(
                    "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
                    shape.join(",")
                ));
            }
            json.push('}');
            let len = lie.unwrap_or(json.len() as u64);
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(json.as_bytes());
            bytes.extend(std::iter::repeat_n(0x3fu8, data_len));
            bytes
        })
}

fn fuzz_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn check_random_and_mutated(target: Target, dir: &Path) {
    let seeds = target.seeds();
    // Every seed is valid as it is: mutations start from accepted inputs.
    for (i, seed) in seeds.iter().enumerate() {
        assert!(
            target.run(dir, seed),
            "{} seed {i} is refused",
            target.name()
        );
    }
    let mut runner = proptest::test_runner::TestRunner::new(fuzz_config(256));
    let strategy = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        4 => (0..seeds.len(), prop::collection::vec(edit(), 1..6))
            .prop_map(move |(i, edits)| apply(seeds[i].clone(), &edits)),
    ];
    runner
        .run(&strategy, |bytes| {
            target.run(dir, &bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", target.name()));
}

#[test]
fn safetensors_reader_survives_random_and_mutated_files() {
    let dir = tempfile::tempdir().unwrap();
    check_random_and_mutated(Target::SafetensorsHeader, dir.path());
}

#[test]
fn index_reader_survives_random_and_mutated_indexes() {
    let dir = sharded_dir();
    check_random_and_mutated(Target::IndexJson, dir.path());
}

#[test]
fn stats_reader_survives_random_and_mutated_files() {
    let dir = tempfile::tempdir().unwrap();
    check_random_and_mutated(Target::StatsFile, dir.path());
}

#[test]
fn config_reader_survives_random_and_mutated_configs() {
    let dir = tempfile::tempdir().unwrap();
    check_random_and_mutated(Target::ConfigYaml, dir.path());
}

proptest! {
    #![proptest_config(fuzz_config(512))]

    #[test]
    fn safetensors_reader_survives_assembled_headers(bytes in assembled_safetensors()) {
        let dir = tempfile::tempdir().unwrap();
        Target::SafetensorsHeader.run(dir.path(), &bytes);
        Target::StatsFile.run(dir.path(), &bytes);
    }
}

#[test]
fn regression_inputs_never_panic_and_errors_name_the_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut replayed = 0;
    for target in TARGETS {
        let dir = sharded_dir();
        for (name, bytes) in target.files_under(&root) {
            let outcome = std::panic::catch_unwind(|| target.run(dir.path(), &bytes));
            assert!(outcome.is_ok(), "{}/{name} panics", target.name());
            replayed += 1;
        }
    }
    assert!(
        replayed >= TARGETS.len(),
        "only {replayed} regression inputs"
    );
}
