//! The caching pass split over the ranks of a data-parallel run. Each rank decodes and encodes
//! every `size`-th image from its rank on; the encodings then reach every rank through the
//! group's sum: each rank contributes its own values where it encoded and zeros elsewhere, and
//! `x + 0 = x` exactly (a −0 arrives as +0, which compares equal), so every rank ends with the
//! encodings one process would have made (each image is encoded alone, so which rank encodes it
//! changes nothing).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::Encoded;
use crate::dataset::CropWindow;
use crate::distributed::ProcessGroup;

/// Which items this rank encodes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shard {
    rank: usize,
    size: usize,
}

impl Shard {
    /// Every item, on one process.
    pub const WHOLE: Self = Self { rank: 0, size: 1 };

    pub fn of(group: &ProcessGroup) -> Self {
        Self {
            rank: group.rank(),
            size: group.size(),
        }
    }

    pub fn owns(&self, item: usize) -> bool {
        item % self.size == self.rank
    }

    /// How many of `items` this rank encodes.
    pub fn count(&self, items: usize) -> usize {
        (0..items).filter(|&i| self.owns(i)).count()
    }
}

/// Per item: the crop window (resized width and height, left, top), then per orientation
/// whether it was encoded and its `[C, h, w]` shape.
const FACTS_PER_ITEM: usize = 4 + 2 * 4;

/// Most values summed at once (64 MiB of f32), which bounds the exchange's buffers.
const CHUNK_VALUES: usize = 1 << 24;

/// An orientation's tensors in the order they travel: the posterior's mean and standard
/// deviation, or the pixels.
fn parts(encoded: &Encoded) -> Vec<&Tensor> {
    match encoded {
        Encoded::Distribution { mean, std } => vec![mean, std],
        Encoded::Pixels(pixels) => vec![pixels],
    }
}

/// Gives every rank the encodings and crop windows of the items other ranks encoded (this
/// rank's `shard`; `latent`: encodings are posteriors, else pixels). Every rank of `group`
/// must call it with the same items.
pub(super) fn share(
    group: &ProcessGroup,
    shard: Shard,
    latent: bool,
    encoded: &mut [[Option<Encoded>; 2]],
    windows: &mut [Option<CropWindow>],
    device: &Device,
) -> Result<()> {
    // First the facts every rank needs to lay out the values: small integers, exact in f32.
    let mut facts = vec![0f32; encoded.len() * FACTS_PER_ITEM];
    for (item, ((both, window), facts)) in encoded
        .iter()
        .zip(windows.iter())
        .zip(facts.chunks_exact_mut(FACTS_PER_ITEM))
        .enumerate()
    {
        if !shard.owns(item) {
            continue;
        }
        let window = window.context("an encoded item without its crop window")?;
        facts[..4].copy_from_slice(&[
            window.resized.0 as f32,
            window.resized.1 as f32,
            window.left as f32,
            window.top as f32,
        ]);
        for (slot, facts) in both.iter().zip(facts[4..].chunks_exact_mut(4)) {
            if let Some(e) = slot {
                let (c, h, w) = parts(e)[0].dims3()?;
                facts.copy_from_slice(&[1.0, c as f32, h as f32, w as f32]);
            }
        }
    }
    let facts = group
        .sum(Tensor::from_vec(
            facts,
            encoded.len() * FACTS_PER_ITEM,
            device,
        )?)?
        .to_vec1::<f32>()?;
    let tensors_per_slot = if latent { 2 } else { 1 };
    let mut shapes = Vec::with_capacity(encoded.len());
    for (item, (facts, window)) in facts
        .chunks_exact(FACTS_PER_ITEM)
        .zip(windows.iter_mut())
        .enumerate()
    {
        let [resized_w, resized_h, left, top] = [0, 1, 2, 3].map(|i| facts[i] as usize);
        *window = Some(CropWindow {
            resized: (resized_w, resized_h),
            left,
            top,
        });
        ensure!(
            facts[4] == 1.0,
            "item {item}: encoded by {} ranks",
            facts[4]
        );
        let mut slots = [None, None];
        for (slot, facts) in slots.iter_mut().zip(facts[4..].chunks_exact(4)) {
            ensure!(
                facts[0] == 0.0 || facts[0] == 1.0,
                "item {item}: encoded by {} ranks",
                facts[0]
            );
            if facts[0] == 1.0 {
                *slot = Some((facts[1] as usize, facts[2] as usize, facts[3] as usize));
            }
        }
        shapes.push(slots);
    }

    // Then the values, a chunk of items at a time.
    let item_values = |slots: &[Option<(usize, usize, usize)>; 2]| -> usize {
        slots
            .iter()
            .flatten()
            .map(|(c, h, w)| c * h * w)
            .sum::<usize>()
            * tensors_per_slot
    };
    let mut first = 0;
    while first < encoded.len() {
        let mut end = first + 1;
        let mut values = item_values(&shapes[first]);
        while end < encoded.len() && values + item_values(&shapes[end]) <= CHUNK_VALUES {
            values += item_values(&shapes[end]);
            end += 1;
        }
        let mut buffer = Vec::new();
        for (item, slots) in shapes.iter().enumerate().take(end).skip(first) {
            for (slot, shape) in encoded[item].iter().zip(slots) {
                let Some((c, h, w)) = *shape else { continue };
                match (shard.owns(item), slot) {
                    (true, Some(e)) => buffer.extend(parts(e).into_iter().map(|t| t.flatten_all())),
                    (true, None) => bail!("item {item}: another rank encoded this rank's image"),
                    (false, _) => buffer.push(Tensor::zeros(
                        tensors_per_slot * c * h * w,
                        DType::F32,
                        device,
                    )),
                }
            }
        }
        let buffer = buffer
            .into_iter()
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = group.sum(Tensor::cat(&buffer, 0)?)?;
        let mut offset = 0;
        for (item, slots) in shapes.iter().enumerate().take(end).skip(first) {
            for (slot, shape) in encoded[item].iter_mut().zip(slots) {
                let Some((c, h, w)) = *shape else { continue };
                let n = c * h * w;
                if !shard.owns(item) {
                    // Copied out, so that no part keeps the whole chunk alive.
                    let part = |at: usize| {
                        summed
                            .narrow(0, at, n)?
                            .force_contiguous()?
                            .reshape((c, h, w))
                    };
                    *slot = Some(if latent {
                        Encoded::Distribution {
                            mean: part(offset)?,
                            std: part(offset + n)?,
                        }
                    } else {
                        Encoded::Pixels(part(offset)?)
                    });
                }
                offset += tensors_per_slot * n;
            }
        }
        first = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_encode_every_item_once() {
        for (items, size) in [(0, 1), (7, 1), (7, 3), (2, 4)] {
            let shards: Vec<Shard> = (0..size).map(|rank| Shard { rank, size }).collect();
            for item in 0..items {
                assert_eq!(shards.iter().filter(|s| s.owns(item)).count(), 1);
            }
            let counts: usize = shards.iter().map(|s| s.count(items)).sum();
            assert_eq!(counts, items);
        }
        assert!((0..5).all(|i| Shard::WHOLE.owns(i)));
    }
}
