//! Reading and writing weights: memory-mapped safetensors behind candle's `VarBuilder`
//! (`weights`), whole-file safetensors reading with its metadata, atomic file output and output
//! folder checks (`files`), and PyTorch pickles, refused unless asked for (`pickle`).

pub mod files;
pub mod pickle;
pub mod weights;

pub use files::{
    folder_of, free_space, not_safetensors, probe_writable, read_safetensors, write_atomic,
    write_folder_atomic, write_safetensors_atomic, SafetensorsContents,
};
