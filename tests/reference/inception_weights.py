"""Deterministic stand-in weights for pytorch-fid's Inception-v3, reproducible bit for bit in Rust.

The real FID weights (pt_inception-2015-12-05, 95 MB) cannot be downloaded here and a random
checkpoint of that size cannot be committed, so the parity test regenerates every tensor from its
name. `tests/common/inception_weights.rs` is the Rust twin of this file: change both together.

The generator, per tensor name:

- seed = FNV-1a 64 of the name's UTF-8 bytes;
- a SplitMix64 stream from that seed (`lora_core::rng::Rng`): state += 0x9E3779B97F4A7C15, then
  the usual mix; output i uses state seed + (i + 1)·0x9E3779B97F4A7C15 (mod 2⁶⁴);
- u = ((z >> 40) / 2²⁴)·2 − 1, uniform in [−1, 1) on a 2⁻²³ grid, so exact in f32;
- value = f32(a + b·u) with a, b per kind of tensor, computed in f64 (see `affine`).

The scales keep activations O(1) through the ~94 conv + BN + ReLU layers: a conv weight is
uniform with variance gain²·2/fan_in (He's ReLU-preserving scale), and BN stays close to the
identity (γ ≈ 1, β ≈ 0, mean ≈ 0, var ∈ [0.5, 1.5)).
"""

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# 1.0 keeps every stage's mean near 1 (checked by `python3 inception_weights.py`); larger
# gains grow them geometrically with depth, smaller ones shrink them.
CONV_GAIN = 1.0


def fnv1a(key: str) -> int:
    h = 0xCBF29CE484222325
    for byte in key.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def uniform(key: str, count: int) -> np.ndarray:
    """The first `count` values of the stream for `key`, uniform in [−1, 1), as f64."""
    with np.errstate(over="ignore"):
        state = np.uint64(fnv1a(key)) + np.arange(1, count + 1, dtype=np.uint64) * GOLDEN
        z = state
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24) * 2.0 - 1.0


def affine(key: str, shape) -> tuple:
    """(a, b) such that the tensor `key` of `shape` is a + b·u."""
    if key.endswith("bn.weight"):
        return 1.0, 0.1
    if key.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
        return 0.0, 0.1
    if key.endswith("bn.running_var"):
        return 1.0, 0.5
    if key == "fc.weight":
        return 0.0, float(np.sqrt(3.0 / shape[1]))
    if key.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        return 0.0, float(np.sqrt(6.0 / fan_in)) * CONV_GAIN
    if key == "input":
        return 0.0, 1.0
    raise ValueError(f"no deterministic rule for tensor `{key}`")


def tensor(key: str, shape) -> np.ndarray:
    """The f32 tensor `key` of `shape`."""
    a, b = affine(key, shape)
    count = int(np.prod(shape))
    return (a + b * uniform(key, count)).astype(np.float32).reshape(shape)


def fid_inception_state(model):
    """The deterministic state dict for `model` (a torch module, for its names and shapes): every
    float tensor regenerated from its name, `num_batches_tracked` zero."""
    import torch

    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(value)
        else:
            out[key] = torch.from_numpy(tensor(key, tuple(value.shape)))
    return out


if __name__ == "__main__":
    # Prints the scale of each stage's output for the two fixture images: every stage should be
    # O(0.1–10), neither growing with depth nor dying out.
    import torch

    from make_inception_fixtures import build_model, model_input

    torch.set_num_threads(2)
    model, _ = build_model()
    x = torch.from_numpy(model_input(2))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for layer in block:
                x = layer(x)
                name = type(layer).__name__
                print(f"block {i} {name:18s} {tuple(x.shape)} mean {x.mean():.4f} "
                      f"rms {x.pow(2).mean().sqrt():.4f} max {x.max():.4f}")
