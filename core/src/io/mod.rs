//! Checkpoint input and output: memory-mapped safetensors (single file,
//! directory, or shards with `model.safetensors.index.json`) and the
//! streaming, sharded writer.
