//! Any bytes as a safetensors checkpoint file: the header length, the JSON
//! header (dtypes, shapes, offsets, overlaps, metadata) and every tensor
//! view. Must never panic; every error names the file.
#![no_main]

use flatmerge::io::Checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = flatmerge_fuzz::write("model.safetensors", data);
    let opened = Checkpoint::open_file(&path);
    if let Ok(checkpoint) = &opened {
        // Accepted files must give in-bounds views of every tensor.
        for info in checkpoint.tensors() {
            let view = checkpoint
                .view(&info.name)
                .expect("a listed tensor has a view");
            assert_eq!(view.data.len(), info.nbytes());
            if info.dtype.is_float() {
                let _ = view.to_f32_vec();
            }
        }
    }
    flatmerge_fuzz::check_names_file(opened, &[&path]);
});
