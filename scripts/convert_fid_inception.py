#!/usr/bin/env python3
"""Convert pytorch-fid's FID Inception weights (.pth) to .safetensors for lora-eval.

pytorch-fid downloads `pt_inception-2015-12-05-6726825d.pth` (the TensorFlow FID graph ported to
torchvision's Inception-v3 names). This writes the same tensors under the same names as
safetensors, which `lora_core::models::inception::FidInception::load` reads: f32 by default,
f16 with --fp16; `num_batches_tracked` counters (unused in eval) are dropped. The pickle is read
with `torch.load(weights_only=True)`, which builds tensors only and runs no code from the file.

The output is written atomically (a temporary file beside it, synced, renamed) and its sha256 is
printed; `FidInception::weights_sha256` reports the same hash for the file it loaded.

Usage: python3 scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth \\
           fid_inception.safetensors [--fp16]
"""

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

# Two tensors every FID Inception state dict has, with their shapes: a cheap check that the input
# is that network and not some other checkpoint.
LANDMARKS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(state: dict, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise SystemExit(f"`{key}` is not a floating-point tensor: {type(value).__name__}")
        out[key] = value.detach().to(dtype).contiguous()
    for key, shape in LANDMARKS.items():
        if key not in out:
            raise SystemExit(f"`{key}` is missing: not pytorch-fid's Inception state dict")
        if tuple(out[key].shape) != shape:
            raise SystemExit(f"`{key}` has shape {tuple(out[key].shape)}, expected {shape}")
    return out


def write_atomic(tensors: dict, out: Path, metadata: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # The temporary file is owner-only; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pth", type=Path, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("out", type=Path, help="output .safetensors")
    parser.add_argument("--fp16", action="store_true", help="store f16 instead of f32")
    args = parser.parse_args()
    if args.out.resolve() == args.pth.resolve():
        raise SystemExit("the output would overwrite the input")

    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    tensors = convert(state, torch.float16 if args.fp16 else torch.float32)
    source_sha = sha256(args.pth)
    # One metadata entry: safetensors writes several in an arbitrary order, which would make the
    # output's bytes (and its sha256) differ from run to run.
    metadata = {"source": f"{args.pth.name} sha256:{source_sha}"}
    write_atomic(tensors, args.out, metadata)
    print(f"{args.pth}: sha256 {source_sha}")
    print(f"{args.out}: {len(tensors)} tensors, {'f16' if args.fp16 else 'f32'}, "
          f"sha256 {sha256(args.out)}")


if __name__ == "__main__":
    sys.exit(main())
