//! File formats and key maps: adapter files (reading both layouts, resolving them against a
//! model), each layout's writer and metadata (`kohya`, `peft`), the key spellings of each layout
//! (`keys`), and single-file (original LDM) checkpoints served under diffusers names (`ldm`,
//! `single_file`).

pub mod adapter_file;
pub mod checkpoint_kind;
pub mod keys;
pub mod kohya;
pub mod ldm;
pub mod peft;
pub mod single_file;

use crate::adapters::{AdapterModule, ModuleInfo};
use keys::Component;

/// One adapter module about to be written, with the model module it belongs to: what each
/// layout's writer reads.
pub(crate) struct OutputModule<'a> {
    pub(crate) component: Component,
    pub(crate) info: &'a ModuleInfo,
    pub(crate) module: &'a AdapterModule,
}
