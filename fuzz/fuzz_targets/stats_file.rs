//! Any bytes as an activation statistics file (SPEC §4): the safetensors
//! layer below it, then metadata (format, version, examples), tensor
//! names, dtypes, shapes, counts and non-finite values. Must never panic;
//! every error names the file.
#![no_main]

use flatmerge::stats::ActivationStats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = flatmerge_fuzz::write("a.stats.safetensors", data);
    let loaded = ActivationStats::load(&path);
    if let Ok(stats) = &loaded {
        // What loads must be what the checks promise.
        for layer in stats.layers.values() {
            assert!(layer.count.is_none_or(|c| c >= 1));
            for v in layer.x_mean.iter().chain(&layer.y_mean).flatten() {
                assert!(v.is_finite());
            }
        }
    }
    flatmerge_fuzz::check_names_file(loaded, &[&path]);
});
