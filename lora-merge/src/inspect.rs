//! `inspect`: what an adapter file holds — layout, base model, modules, ranks, alphas, targets
//! and header metadata — as text or JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use lora_core::formats::keys::Component;
use lora_core::AdapterFile;

use serde_json::{json, Value};

/// A summary of one adapter file.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub path: String,
    pub format: String,
    /// From kohya's `ss_base_model_version` / `ss_v2` or `modelspec.architecture`, if recorded.
    pub base_model: Option<String>,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    pub text_encoder_2_modules: usize,
    /// Rank → number of modules.
    pub ranks: BTreeMap<usize, usize>,
    /// Alpha (as printed) → number of modules.
    pub alphas: BTreeMap<String, usize>,
    /// Layer kinds adapted (`to_q`, `proj_in`, `ff.net.0.proj`, `q_proj`, …).
    pub targets: BTreeSet<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Layer names as they end module paths; kohya names end in the same with `.` → `_`.
const TARGETS: [&str; 24] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
    // LoCon / LyCORIS targets outside the transformer blocks.
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
];

/// Describes a LoRA/LoCon file (kohya or PEFT) or a LyCORIS LoHa/LoKr file (format
/// `lycoris-loha`, `lycoris-lokr`; a LoKr module with two full halves has rank 0, and a
/// missing alpha is the rank, as LyCORIS reads it).
pub fn inspect(path: &Path) -> Result<Inspection> {
    let file = AdapterFile::read(path, &Device::Cpu)?;
    // (component, module name, rank, alpha as printed)
    let lora = file.raw_modules().iter().map(|m| {
        (
            m.component,
            m.name.clone(),
            m.rank(),
            format!("{:?}", m.alpha),
        )
    });
    let lycoris = file
        .lycoris_modules()
        .iter()
        .map(|((c, name), m)| (*c, name.clone(), m.rank(), format!("{:?}", m.alpha)));
    let modules: Vec<(Component, String, usize, String)> = lora.chain(lycoris).collect();
    let (format, metadata) = (file.describe_format(), file.metadata().clone());
    let mut inspection = Inspection {
        path: path.display().to_string(),
        format,
        base_model: base_model(&metadata),
        unet_modules: 0,
        text_encoder_modules: 0,
        text_encoder_2_modules: 0,
        ranks: BTreeMap::new(),
        alphas: BTreeMap::new(),
        targets: BTreeSet::new(),
        metadata,
    };
    for (component, name, rank, alpha) in modules {
        match component {
            Component::Unet => inspection.unet_modules += 1,
            Component::TextEncoder => inspection.text_encoder_modules += 1,
            Component::TextEncoder2 => inspection.text_encoder_2_modules += 1,
        }
        *inspection.ranks.entry(rank).or_default() += 1;
        *inspection.alphas.entry(alpha).or_default() += 1;
        let flat = name.replace('.', "_");
        let target = TARGETS
            .iter()
            .find(|t| flat.ends_with(&format!("_{}", t.replace('.', "_"))))
            .map_or("other", |t| t);
        inspection.targets.insert(target.to_string());
    }
    Ok(inspection)
}

fn base_model(metadata: &BTreeMap<String, String>) -> Option<String> {
    metadata
        .get("ss_base_model_version")
        .or_else(|| metadata.get("modelspec.architecture"))
        .cloned()
        .or_else(|| match metadata.get("ss_v2").map(String::as_str) {
            Some("True") => Some("sd_v2".to_string()),
            Some("False") => Some("sd_v1".to_string()),
            _ => None,
        })
}

/// A string from a stranger's file as it is printed: control characters escaped (a header may
/// carry terminal escape sequences), cut to at most `max` characters and marked with `…` (long
/// JSON metadata would flood the terminal; `--json` has it all).
fn shortened(text: &str, max: usize) -> String {
    let cut = match text.char_indices().nth(max) {
        Some((cut, _)) => &text[..cut],
        None => text,
    };
    let mut shown: String = cut
        .chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect();
    if cut.len() < text.len() {
        shown.push('…');
    }
    shown
}

impl Inspection {
    pub fn to_json(&self) -> Value {
        json!({
            "path": self.path,
            "format": self.format,
            "base_model": self.base_model,
            "modules": {
                "unet": self.unet_modules,
                "text_encoder": self.text_encoder_modules,
                "text_encoder_2": self.text_encoder_2_modules,
            },
            "ranks": self.ranks,
            "alphas": self.alphas,
            "targets": self.targets,
            "metadata": self.metadata,
        })
    }

    pub fn to_text(&self) -> String {
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ranks: BTreeMap<String, usize> = self
            .ranks
            .iter()
            .map(|(r, n)| (r.to_string(), *n))
            .collect();
        let mut text = String::new();
        let _ = writeln!(text, "file:       {}", self.path);
        let _ = writeln!(text, "format:     {}", self.format);
        let _ = writeln!(
            text,
            "base model: {}",
            shortened(self.base_model.as_deref().unwrap_or("not recorded"), 80)
        );
        let second = match self.text_encoder_2_modules {
            0 => String::new(),
            n => format!(", {n} second text encoder"),
        };
        let _ = writeln!(
            text,
            "modules:    {} ({} UNet, {} text encoder{second})",
            self.unet_modules + self.text_encoder_modules + self.text_encoder_2_modules,
            self.unet_modules,
            self.text_encoder_modules
        );
        let _ = writeln!(text, "ranks:      {}", counts(&ranks));
        let _ = writeln!(text, "alphas:     {}", counts(&self.alphas));
        let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        let _ = writeln!(text, "targets:    {}", targets.join(", "));
        if !self.metadata.is_empty() {
            let _ = writeln!(text, "metadata:");
            for (k, v) in &self.metadata {
                let _ = writeln!(text, "  {}: {}", shortened(k, 80), shortened(v, 120));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_strings_are_escaped_and_capped() {
        assert_eq!(shortened("plain", 10), "plain");
        assert_eq!(shortened("abcdefgh", 3), "abc…");
        // An escape sequence that would recolour or clear the terminal is shown, not sent.
        assert_eq!(shortened("a\u{1b}[2Jb\n", 20), "a\\u{1b}[2Jb\\n");
        assert_eq!(shortened("ééé", 2), "éé…");
    }
}
