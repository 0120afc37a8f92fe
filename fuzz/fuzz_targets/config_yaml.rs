//! Any bytes as a merge config (mergekit YAML plus flatmerge's keys): YAML
//! syntax, unknown keys, wrong types, out-of-range parameters, per-model
//! and filtered parameters. Must never panic; every error names the file.
#![no_main]

use flatmerge::config::MergeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = flatmerge_fuzz::write("merge.yaml", data);
    flatmerge_fuzz::check_names_file(MergeConfig::from_file(&path), &[&path]);
});
