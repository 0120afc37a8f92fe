//! Sharded checkpoints: a sharded input merges exactly like the same model
//! in one file, and a sharded output (`--out-shard-size`) is a Hugging Face
//! shard set whose index matches its shards and which reopens to the same
//! tensors as a single-file output.

use flatmerge::dtype::Dtype;
use flatmerge::io::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use flatmerge_suite::{
    edit_config, family, merge, read_tensors, report, rewrite_model, safetensors_header, tempdir,
    Edit, SMALL,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Shard file names of a directory, sorted.
fn shard_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
}

/// Checks that `dir` is a consistent shard set: the index lists every
/// tensor of every shard exactly once, in the shard holding it, names no
/// other file, and its `total_size` is the bytes of tensor data. Returns
/// the number of shards.
fn check_shard_set(dir: &Path, max_shard_bytes: u64) -> usize {
    let files = shard_files(dir);
    let n = files.len();
    assert!(
        n > 1,
        "expected several shards in {}: {files:?}",
        dir.display()
    );
    assert!(
        !dir.join(SINGLE_FILE).exists(),
        "no model.safetensors beside shards"
    );
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            *f,
            format!("model-{:05}-of-{n:05}.safetensors", i + 1),
            "Hugging Face shard names"
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let mut from_shards: BTreeMap<String, String> = BTreeMap::new();
    let mut total = 0u64;
    for f in &files {
        let (header, data_bytes) = safetensors_header(&dir.join(f));
        total += data_bytes;
        let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
        assert!(!names.is_empty(), "{f} holds no tensor");
        // A shard exceeds the limit only when it holds one tensor larger than it.
        assert!(
            data_bytes <= max_shard_bytes || names.len() == 1,
            "{f}: {data_bytes} bytes in {} tensors",
            names.len()
        );
        for name in names {
            assert!(
                from_shards.insert(name.clone(), f.clone()).is_none(),
                "{name} in two shards"
            );
        }
    }
    let listed: BTreeMap<String, String> = weight_map
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("file name").to_string()))
        .collect();
    assert_eq!(
        listed, from_shards,
        "index weight_map vs the shards' headers"
    );
    let named: BTreeSet<&String> = listed.values().collect();
    assert_eq!(named.len(), n, "every shard is named by the index");
    assert_eq!(
        index["metadata"]["total_size"], total,
        "total_size is the tensor data bytes"
    );
    n
}

#[test]
fn sharded_inputs_merge_like_single_files() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::BF16, 1, 31);
    let single = tmp.path().join("single");
    let c = flatmerge_suite::config(&fam);
    merge(c, &single, None, None);

    // Receiver, contributor and ancestor re-written as shards of ≤ 6 KB.
    for m in ["A", "B", "C"] {
        let src = fam.dir.join(m);
        let dst = fam.dir.join(format!("{m}_sharded"));
        rewrite_model(&src, &dst, Some(6_000), |_, _| Edit::Keep, vec![]);
        check_shard_set(&dst, 6_000);
        assert_eq!(
            read_tensors(&dst),
            read_tensors(&src),
            "{m}: resharding keeps every tensor"
        );
    }
    let sharded_config = edit_config(&fam, |t| {
        t.replace("base_model: ./C\n", "base_model: ./C_sharded\n")
            .replace("model: ./A\n", "model: ./A_sharded\n")
            .replace("model: ./B\n", "model: ./B_sharded\n")
    });
    assert!(sharded_config.models[0].path.ends_with("A_sharded"));
    let from_shards = tmp.path().join("from-shards");
    merge(sharded_config, &from_shards, None, None);
    assert!(
        std::fs::read(single.join(SINGLE_FILE)).unwrap()
            == std::fs::read(from_shards.join(SINGLE_FILE)).unwrap(),
        "merged bytes differ between sharded and single-file inputs"
    );
    // The report fingerprints every shard of each input.
    let json = report(&from_shards);
    for input in json["inputs"].as_array().unwrap() {
        let dir = Path::new(input["path"].as_str().unwrap());
        let files = input["files"].as_array().unwrap();
        assert_eq!(files.len(), shard_files(dir).len(), "{}", dir.display());
        for f in files {
            let path = Path::new(f["path"].as_str().unwrap());
            assert_eq!(f["size"], std::fs::metadata(path).unwrap().len());
        }
    }
}

#[test]
fn out_shard_size_writes_an_indexed_shard_set_that_reopens_to_the_same_tensors() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("family"), &SMALL, Dtype::F16, 1, 37);
    let single = tmp.path().join("single");
    merge(flatmerge_suite::config(&fam), &single, None, None);
    let sharded = tmp.path().join("sharded");
    // SMALL's largest tensors (embeddings, lm_head: 64×32 F16) are 4096 B.
    let summary = merge(flatmerge_suite::config(&fam), &sharded, None, Some(10_000));
    let n = check_shard_set(&sharded, 10_000);
    assert_eq!(Checkpoint::open(&sharded).unwrap().shard_paths().len(), n);
    assert_eq!(
        read_tensors(&sharded),
        read_tensors(&single),
        "sharded output reopens to the same tensors, in order"
    );
    // Opening the index file itself gives the same.
    assert_eq!(
        read_tensors(&sharded.join(INDEX_FILE)),
        read_tensors(&single)
    );
    // The report lists the shards as written.
    let json = report(&sharded);
    let shards = json["shards"].as_array().unwrap();
    assert_eq!(shards.len(), n);
    assert_eq!(summary.report.shards.len(), n);
    let mut tensors = 0;
    for (s, f) in shards.iter().zip(shard_files(&sharded)) {
        assert_eq!(s["file"], f.as_str());
        let (header, bytes) = safetensors_header(&sharded.join(&f));
        assert_eq!(s["bytes"], bytes);
        assert_eq!(
            s["tensors"],
            header.keys().filter(|k| *k != "__metadata__").count()
        );
        tensors += s["tensors"].as_u64().unwrap();
        // Every shard carries the metadata.
        assert_eq!(header["__metadata__"]["format"], "pt", "{f}");
    }
    assert_eq!(tensors as usize, SMALL.tensors().len());
    // A limit larger than the model gives one file and no index.
    let one = tmp.path().join("one");
    merge(flatmerge_suite::config(&fam), &one, None, Some(1 << 30));
    assert!(one.join(SINGLE_FILE).is_file() && !one.join(INDEX_FILE).exists());
}
