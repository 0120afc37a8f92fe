//! Any bytes as `model.safetensors.index.json` beside two valid shards
//! (`a.safetensors` holding `x`, `b.safetensors` holding `y`): JSON,
//! duplicate and missing names, shard file names (no escaping the
//! directory), index/shard agreement. Must never panic; every error names
//! the index or one of the directory's files.
#![no_main]

use flatmerge::dtype::Dtype;
use flatmerge::io::{Checkpoint, OutputTensor, SafetensorsWriter, INDEX_FILE};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = flatmerge_fuzz::scratch().join("sharded");
        std::fs::create_dir_all(&dir).expect("create the model directory");
        for (file, name) in [("a.safetensors", "x"), ("b.safetensors", "y")] {
            let tensors = [OutputTensor::new(name, Dtype::F32, vec![2])];
            let mut w = SafetensorsWriter::create(&dir.join(file), &tensors, &BTreeMap::new())
                .expect("create a shard");
            w.write_tensor(name, &[0u8; 8]).expect("write a shard");
            w.finish().expect("finish a shard");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = model_dir();
    let index = dir.join(INDEX_FILE);
    std::fs::write(&index, data).expect("write the index");
    flatmerge_fuzz::check_names_file(Checkpoint::open(dir), &[dir]);
});
