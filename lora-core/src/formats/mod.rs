//! File formats and key maps: adapter files (kohya/A1111, peft/diffusers), the key spellings of
//! each layout, and single-file (original LDM) checkpoints served under diffusers names.

pub mod adapter_file;
pub mod keys;
pub mod ldm;
pub mod single_file;
