//! Reading and writing weights: memory-mapped safetensors behind candle's `VarBuilder`
//! (`weights`), whole-file safetensors reading with its metadata, atomic file output and output
//! folder checks (`files`), PyTorch pickles, refused unless asked for (`pickle`), and panics of
//! other crates' readers on damaged files turned into errors (`panic_guard`).

pub mod files;
pub mod panic_guard;
pub mod pickle;
pub mod weights;

pub use files::{
    folder_of, free_space, not_safetensors, probe_writable, read_safetensors, start_writeback,
    write_atomic, write_folder_atomic, write_safetensors_atomic, SafetensorsContents,
};
pub use panic_guard::contain_panics;
