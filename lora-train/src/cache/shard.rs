//! The caching pass split over the ranks of a data-parallel run. Each rank encodes every
//! `size`-th image (with centre crops) and distinct caption (unless the text encoder trains)
//! from its rank on; the results then reach every rank through the
//! group's sum: each rank contributes its own values where it encoded and zeros elsewhere, and
//! `x + 0 = x` exactly (a −0 arrives as +0, which compares equal), so every rank ends with the
//! encodings one process would have made (each image and caption is encoded alone, so which rank
//! encodes it changes nothing).

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

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

/// Most dimensions a shared tensor may have.
const MAX_DIMS: usize = 4;

/// Per slot: whether it was computed, its number of dimensions and the dimensions.
const FACTS_PER_SLOT: usize = 2 + MAX_DIMS;

/// Most values summed at once (64 MiB of f32), which bounds the exchange's buffers (a larger
/// item goes alone).
const CHUNK_VALUES: usize = 1 << 24;

/// Gives every rank the f32 tensors the other ranks computed: `items[i][j]` is item `i`'s `j`-th
/// tensor, computed (`Some`) on the rank whose `shard` owns item `i` and `None` on the others;
/// a slot the owner left `None` stays `None` everywhere. Every rank of `group` must call it
/// with as many items and slots per item.
pub(super) fn share(
    group: &ProcessGroup,
    shard: Shard,
    items: &mut [Vec<Option<Tensor>>],
    device: &Device,
) -> Result<()> {
    let slots = items.first().map_or(0, Vec::len);
    ensure!(
        items.iter().all(|item| item.len() == slots),
        "items with different numbers of tensors to share"
    );
    // Every rank has as many items and slots, so all of them return here together.
    if slots == 0 {
        return Ok(());
    }
    // First the shapes, which lay the values out: small integers, exact in f32.
    let mut facts = vec![0f32; items.len() * slots * FACTS_PER_SLOT];
    for (i, (item, facts)) in items
        .iter()
        .zip(facts.chunks_exact_mut(slots * FACTS_PER_SLOT))
        .enumerate()
    {
        if !shard.owns(i) {
            continue;
        }
        for (tensor, facts) in item.iter().zip(facts.chunks_exact_mut(FACTS_PER_SLOT)) {
            let Some(tensor) = tensor else { continue };
            let dims = tensor.dims();
            ensure!(
                dims.len() <= MAX_DIMS,
                "item {i}: a tensor of shape {dims:?} to share"
            );
            facts[0] = 1.0;
            facts[1] = dims.len() as f32;
            for (fact, &dim) in facts[2..].iter_mut().zip(dims) {
                *fact = dim as f32;
            }
        }
    }
    let len = facts.len();
    let facts = group
        .sum(Tensor::from_vec(facts, len, device)?)?
        .to_vec1::<f32>()?;
    let mut shapes: Vec<Vec<Option<Vec<usize>>>> = Vec::with_capacity(items.len());
    for (i, facts) in facts.chunks_exact(slots * FACTS_PER_SLOT).enumerate() {
        let mut item = Vec::with_capacity(slots);
        for facts in facts.chunks_exact(FACTS_PER_SLOT) {
            ensure!(
                facts[0] == 0.0 || facts[0] == 1.0,
                "item {i}: computed by {} ranks",
                facts[0]
            );
            let rank = facts[1] as usize;
            item.push(
                (facts[0] == 1.0).then(|| facts[2..2 + rank].iter().map(|&d| d as usize).collect()),
            );
        }
        shapes.push(item);
    }

    // Then the values, a chunk of items at a time.
    let values_of = |item: &[Option<Vec<usize>>]| -> usize {
        item.iter()
            .flatten()
            .map(|dims| dims.iter().product::<usize>())
            .sum()
    };
    let mut first = 0;
    while first < items.len() {
        let mut end = first + 1;
        let mut values = values_of(&shapes[first]);
        while end < items.len() && values + values_of(&shapes[end]) <= CHUNK_VALUES {
            values += values_of(&shapes[end]);
            end += 1;
        }
        let mut buffer = Vec::new();
        for i in first..end {
            for (tensor, dims) in items[i].iter().zip(&shapes[i]) {
                let Some(dims) = dims else { continue };
                buffer.push(match (shard.owns(i), tensor) {
                    (true, Some(t)) => t.to_dtype(DType::F32)?.flatten_all()?,
                    (true, None) => bail!("item {i}: another rank computed this rank's tensor"),
                    (false, _) => {
                        Tensor::zeros(dims.iter().product::<usize>(), DType::F32, device)?
                    }
                });
            }
        }
        if !buffer.is_empty() {
            let summed = group.sum(Tensor::cat(&buffer, 0)?)?;
            let mut offset = 0;
            for i in first..end {
                for (tensor, dims) in items[i].iter_mut().zip(&shapes[i]) {
                    let Some(dims) = dims else { continue };
                    let n = dims.iter().product::<usize>();
                    if !shard.owns(i) {
                        // Copied out, so that no part keeps the whole chunk alive.
                        let part = summed.narrow(0, offset, n)?.force_contiguous()?;
                        *tensor = Some(part.reshape(dims.as_slice())?);
                    }
                    offset += n;
                }
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

    /// Nothing to share is no call at all (every rank sees the same empty list).
    #[test]
    fn nothing_to_share_is_fine() {
        let device = Device::Cpu;
        share(&ProcessGroup::alone(), Shard::WHOLE, &mut [], &device).unwrap();
        share(
            &ProcessGroup::alone(),
            Shard::WHOLE,
            &mut [vec![], vec![]],
            &device,
        )
        .unwrap();
    }

    /// Alone, sharing changes nothing and keeps every tensor as it was.
    #[test]
    fn alone_every_tensor_stays() {
        let device = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &device)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let mut items = vec![vec![Some(a.clone()), None]];
        share(&ProcessGroup::alone(), Shard::WHOLE, &mut items, &device).unwrap();
        let got = items[0][0].as_ref().unwrap();
        assert_eq!(got.dims(), &[2, 3]);
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert!(items[0][1].is_none());
    }
}
