//! Checkpoint input and output: memory-mapped safetensors (single file,
//! directory, or shards with `model.safetensors.index.json`) and the
//! streaming, sharded writer.

mod checkpoint;
#[doc(hidden)]
pub mod fault;
mod json;
pub mod lora;
mod mmap;
pub mod rows;
mod writer;

pub use checkpoint::{Checkpoint, FileFingerprint, TensorInfo, TensorView};
pub use writer::{write_atomically, OutputTensor, SafetensorsWriter, ShardPlan, ShardedWriter};

/// The weights file of a single-file model directory (Hugging Face layout).
pub const SINGLE_FILE: &str = "model.safetensors";

/// The index of a sharded model directory: `{"metadata": {...},
/// "weight_map": {tensor: shard file}}` (Hugging Face layout).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
