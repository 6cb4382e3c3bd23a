//! Reading and writing weights: memory-mapped safetensors behind candle's `VarBuilder`
//! (`weights`), whole-file safetensors reading with its metadata, and atomic file output
//! (`files`).

pub mod files;
pub mod weights;

pub use files::{read_safetensors, write_atomic, write_safetensors_atomic, SafetensorsContents};
