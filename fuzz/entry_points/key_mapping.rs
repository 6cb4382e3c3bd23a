//! Fuzz entry for the key maps: tensor names as a stranger's file spells them, turned into module
//! paths (adapter keys of both layouts, model weights, single-file LDM checkpoints) and back. Any
//! name must map or be refused, never panic. Shared by `fuzz_targets/key_mapping.rs` and the
//! regression test at the workspace root.
//!
//! Input: one tensor name per line, each optionally followed by a space and its shape as
//! comma-separated numbers (`down_blocks.0.attentions.0.proj_in.weight 320,320,1,1`).

use lora_core::adapters::{ModuleInfo, ModuleKind};
use lora_core::formats::keys::{
    kohya_name, locon_module_from_weight, module_from_weight, parse_diffusers_key, parse_kohya_key,
    Component, KohyaNames,
};
use lora_core::formats::ldm::{
    DiffusersTensor, LdmLayout, LdmTarget, LdmTensor, ModelPart, TextEncoderLayout,
};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<(&str, Vec<usize>)> = text.lines().map(name_and_shape).collect();

    for (name, shape) in &lines {
        let _ = (parse_kohya_key(name), parse_diffusers_key(name));
        for component in Component::ALL {
            let _ = kohya_name(component, name, false);
            let _ = kohya_name(component, name, true);
            let _ = module_from_weight(component, name, shape);
            let _ = locon_module_from_weight(component, name, shape);
        }
    }
    kohya_lookups(&lines);
    for layout in ldm_layouts(data, &lines) {
        ldm_round_trips(&layout, &lines);
    }
}

/// `name 1,2,3` → (`name`, [1, 2, 3]); numbers that do not parse are left out.
fn name_and_shape(line: &str) -> (&str, Vec<usize>) {
    match line.rsplit_once(' ') {
        Some((name, dims)) => (
            name,
            dims.split(',').filter_map(|d| d.parse().ok()).collect(),
        ),
        None => (line, Vec::new()),
    }
}

/// The names as a model's modules, indexed by their kohya names and looked up again.
fn kohya_lookups(lines: &[(&str, Vec<usize>)]) {
    let modules: Vec<ModuleInfo> = lines
        .iter()
        .map(|(name, _)| ModuleInfo {
            path: name.to_string(),
            kind: ModuleKind::Linear,
            in_features: 1,
            out_features: 1,
        })
        .collect();
    let Ok(names) = KohyaNames::new(&modules, &modules, &modules) else {
        return;
    };
    for (name, _) in lines {
        for component in Component::ALL {
            let _ = names.lookup(&kohya_name(component, name, true));
        }
        let _ = names.lookup(name);
    }
}

/// The layout the names describe, if they are a single-file checkpoint's, and one drawn from the
/// first bytes within the limits `LdmLayout::detect` enforces (so the mapping is reached without
/// the fuzzer first having to build a whole checkpoint's key set).
fn ldm_layouts(data: &[u8], lines: &[(&str, Vec<usize>)]) -> Vec<LdmLayout> {
    let mut layouts: Vec<LdmLayout> = LdmLayout::detect(lines.iter().map(|(name, _)| *name))
        .into_iter()
        .collect();
    if let [a, b, ..] = data {
        layouts.push(LdmLayout {
            layers_per_block: usize::from(a % 4) + 1,
            vae_up_blocks: usize::from(b % 8),
            text_encoder: match a >> 6 {
                0 | 1 => TextEncoderLayout::Clip,
                2 => TextEncoderLayout::OpenClip,
                _ => TextEncoderLayout::Sdxl,
            },
        });
    }
    layouts
}

/// Each name read as a single-file key and written back, and as a diffusers name of each part.
/// A name that can be written must read back as itself: otherwise converting a model to a single
/// file would silently move a tensor.
fn ldm_round_trips(layout: &LdmLayout, lines: &[(&str, Vec<usize>)]) {
    let up_blocks_with_attention = [1, 2, 3];
    let write = |t: &DiffusersTensor| {
        let Ok(target) = layout.ldm_key(t, &up_blocks_with_attention) else {
            return;
        };
        let read_back = match (layout.diffusers_name(target.key()), &target) {
            (Ok(LdmTensor::Renamed(back)), LdmTarget::Key { .. }) => Some(back),
            (Ok(LdmTensor::StackedQkv(parts)), LdmTarget::Stacked { index, .. }) => {
                parts.get(*index).cloned()
            }
            (Ok(LdmTensor::Transposed(back)), LdmTarget::Transposed { .. }) => Some(back),
            _ => None,
        };
        let canonical = |t: &DiffusersTensor| (t.part, t.part.canonical_name(&t.name));
        assert_eq!(
            read_back.as_ref().map(canonical),
            Some(canonical(t)),
            "{t:?} is written as {target:?}, which reads back as another tensor"
        );
    };
    for (name, _) in lines {
        match layout.diffusers_name(name) {
            Ok(LdmTensor::Renamed(t)) | Ok(LdmTensor::Transposed(t)) => write(&t),
            Ok(LdmTensor::StackedQkv(parts)) => parts.iter().for_each(write),
            Ok(LdmTensor::Other) | Err(_) => {}
        }
        for part in ModelPart::ALL {
            let _ = part.canonical_name(name);
            write(&DiffusersTensor {
                part,
                name: name.to_string(),
            });
        }
    }
}
