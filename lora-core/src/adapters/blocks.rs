//! The UNet's blocks as kohya names them for per-block learning rates and ranks (its
//! `down_lr_weight` / `mid_lr_weight` / `up_lr_weight` and `block_dims`): `in0`…`in11`, `mid`,
//! `out0`…`out11` for SD1.x/SD2.x, the rows of the original model's `input_blocks`,
//! `middle_block` and `output_blocks`. `in0` is `conv_in`; then each down block has one row per
//! layer (its resnet and attention) and one for its downsampler; each up block one row per layer,
//! its upsampler sharing the last row.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

/// The block rows of one UNet architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetBlocks {
    /// Resnets per down block (diffusers' `layers_per_block`); up blocks have one more, in
    /// reverse order.
    layers_per_block: Vec<usize>,
}

impl UNetBlocks {
    pub fn new(layers_per_block: &[usize]) -> Self {
        Self {
            layers_per_block: layers_per_block.to_vec(),
        }
    }

    /// Rows of `input_blocks`: conv_in, each down block's layers and its downsampler (not the
    /// last block's).
    fn input_rows(&self) -> usize {
        1 + self.layers_per_block.iter().map(|l| l + 1).sum::<usize>() - 1
    }

    /// Rows of `output_blocks`: each up block's layers.
    fn output_rows(&self) -> usize {
        self.layers_per_block.iter().map(|l| l + 1).sum()
    }

    /// Every block name, in model order.
    pub fn names(&self) -> Vec<String> {
        (0..self.input_rows())
            .map(|i| format!("in{i}"))
            .chain(["mid".to_string()])
            .chain((0..self.output_rows()).map(|i| format!("out{i}")))
            .collect()
    }

    /// The block of the module at `path` (a diffusers UNet path such as
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`); `None` outside the blocks
    /// (`conv_in`, `time_embedding`, `conv_out`, …).
    pub fn block_of(&self, path: &str) -> Option<String> {
        if path.starts_with("mid_block.") {
            return Some("mid".into());
        }
        let parts: Vec<&str> = path.split('.').collect();
        let (down, b, kind, l) = match parts.as_slice() {
            ["down_blocks", b, kind, l, ..] => (true, b.parse().ok()?, *kind, l.parse().ok()?),
            ["up_blocks", b, kind, l, ..] => (false, b.parse().ok()?, *kind, l.parse().ok()?),
            _ => return None,
        };
        let b: usize = b;
        let l: usize = l;
        // Layers per block in the order the blocks are counted: up blocks mirror down blocks.
        let per: Vec<usize> = match down {
            true => self.layers_per_block.iter().map(|l| l + 1).collect(),
            false => self.layers_per_block.iter().rev().map(|l| l + 1).collect(),
        };
        let rows_before: usize = per.get(..b)?.iter().sum();
        let row = match kind {
            "resnets" | "attentions" if l < per[b] => rows_before + l,
            // The downsampler's row follows the layers; the upsampler shares the last one.
            "downsamplers" if down => rows_before + per[b] - 1,
            "upsamplers" if !down => rows_before + per[b] - 1,
            _ => return None,
        };
        Some(match down {
            true => format!("in{}", row + 1),
            false => format!("out{row}"),
        })
    }

    /// Checks that every name of `values` (`--block-lr`, `--block-rank`) is a block of this UNet.
    pub fn check_names<T>(&self, flag: &str, values: &BTreeMap<String, T>) -> Result<()> {
        let names = self.names();
        let unknown: Vec<&String> = values.keys().filter(|k| !names.contains(k)).collect();
        ensure!(
            unknown.is_empty(),
            "{flag}: {} not a block of this UNet (its blocks are in0–in{}, mid, out0–out{})",
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            self.input_rows() - 1,
            self.output_rows() - 1
        );
        Ok(())
    }
}

/// Parses `NAME=VALUE` pairs (`in4=0.5`, `mid=2`; kohya's block names) given as one
/// comma-separated list or several, each value by `parse`; `flag` names the option in errors.
pub fn parse_block_values<T>(
    flag: &str,
    pairs: &[String],
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<BTreeMap<String, T>> {
    let mut values = BTreeMap::new();
    for pair in pairs.iter().flat_map(|p| p.split(',')).map(str::trim) {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("{flag} `{pair}`: expected BLOCK=VALUE, e.g. mid=0.5"))?;
        let name = name.trim();
        let valid_name = name == "mid"
            || ["in", "out"].iter().any(|p| {
                name.strip_prefix(p)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
            });
        if !valid_name {
            bail!("{flag} `{pair}`: `{name}` is not a block name (in0…in11, mid, out0…out11)");
        }
        let value =
            parse(value.trim()).with_context(|| format!("{flag} `{pair}`: expected {expected}"))?;
        if values.insert(name.to_string(), value).is_some() {
            bail!("{flag}: block `{name}` is given twice");
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD1.x/SD2.x (layers_per_block 2, four blocks): kohya's `get_block_index` numbering.
    #[test]
    fn sd_blocks_follow_kohya_numbering() {
        let blocks = UNetBlocks::new(&[2, 2, 2, 2]);
        let names = blocks.names();
        assert_eq!(names.len(), 25);
        assert_eq!((names[0].as_str(), names[11].as_str()), ("in0", "in11"));
        assert_eq!((names[12].as_str(), names[24].as_str()), ("mid", "out11"));
        for (path, block) in [
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
                "in1",
            ),
            ("down_blocks.0.attentions.1.proj_in", "in2"),
            ("down_blocks.0.downsamplers.0.conv", "in3"),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                "in4",
            ),
            ("down_blocks.2.resnets.1.conv1", "in8"),
            ("down_blocks.3.resnets.1.conv2", "in11"),
            ("mid_block.attentions.0.proj_out", "mid"),
            ("up_blocks.0.resnets.2.conv1", "out2"),
            ("up_blocks.0.upsamplers.0.conv", "out2"),
            (
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
                "out3",
            ),
            ("up_blocks.3.attentions.2.proj_out", "out11"),
        ] {
            assert_eq!(blocks.block_of(path).as_deref(), Some(block), "{path}");
        }
        for outside in [
            "conv_in",
            "time_embedding.linear_1",
            "down_blocks.0.attentions.5.x",
        ] {
            assert_eq!(blocks.block_of(outside), None, "{outside}");
        }
    }

    #[test]
    fn block_values_parse_and_are_checked() {
        let blocks = UNetBlocks::new(&[1, 1]);
        assert_eq!(
            blocks.names(),
            ["in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3"]
        );
        let number = |v: &str| v.parse::<f64>().ok();
        let values = parse_block_values(
            "--block-lr",
            &["in1=0.5, mid=2".into(), "out3=0".into()],
            number,
            "a number",
        )
        .unwrap();
        assert_eq!(values.len(), 3);
        assert_eq!(values["mid"], 2.0);
        blocks.check_names("--block-lr", &values).unwrap();
        let err = blocks
            .check_names("--block-lr", &BTreeMap::from([("in4".to_string(), 1.0)]))
            .unwrap_err();
        assert!(err.to_string().contains("in0–in3, mid, out0–out3"), "{err}");
        for (bad, expected) in [
            ("mid", "expected BLOCK=VALUE"),
            ("middle=1", "not a block name"),
            ("in=1", "not a block name"),
            ("mid=x", "expected a number"),
            ("mid=1,mid=2", "given twice"),
        ] {
            let err = parse_block_values("--block-lr", &[bad.into()], number, "a number")
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }
}
