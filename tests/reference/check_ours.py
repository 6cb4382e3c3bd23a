"""Load adapter files written by our Rust writers into diffusers and check them.

Usage (after `cargo test --test adapter_interop`, which writes our files):

    .venv-ref/bin/python tests/reference/check_ours.py target/tmp/ours-adapters

For each fixture config, `ours_kohya.safetensors` and `ours_peft.safetensors` (the fixture kohya
adapter, UNet + text encoder, re-written by our code) are loaded with
`StableDiffusionPipeline.load_lora_weights`. The check fails if diffusers/peft report any missing
or unexpected key, or if the UNet / text-encoder outputs differ from the reference outputs of the
original adapter (`unet_out_kohya`, `te_out_kohya`). The verdict, with the exact key list
diffusers accepted, is written to `tests/fixtures/<cfg>/ours_checked.json`; the Rust test
`adapter_files_checked_by_diffusers` asserts our writers still produce exactly those keys.
"""

import json
import sys
import warnings
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from make_fixtures import CaptureLogs, unet_fwd

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BAD_WORDS = ("unexpected", "missing", "not been correctly", "mismatch", "load report", "unsuccessful")
TOLERANCE = 1e-5


def load_with_diffusers(folder: Path, adapter: Path):
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if not (folder / "tokenizer").exists():
        kwargs["tokenizer"] = None
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)
    cap = CaptureLogs()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(cap)
    try:
        with warnings.catch_warnings(record=True) as wrec:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="ours")
    finally:
        for lg in loggers:
            lg.removeHandler(cap)
    messages = cap.records + [str(w.message) for w in wrec]
    bad = [m for m in messages if any(w in m.lower() for w in BAD_WORDS)]
    return pipe, bad


def check(cfg: str, ours_dir: Path) -> dict:
    folder = FIXTURES / cfg
    exp = load_file(str(folder / "expected.safetensors"))
    verdict = {}
    for fmt in ("kohya", "peft"):
        path = ours_dir / cfg / f"ours_{fmt}.safetensors"
        pipe, bad = load_with_diffusers(folder, path)
        assert not bad, f"{path}: diffusers reported {bad}"
        with torch.no_grad():
            unet_out = unet_fwd(pipe.unet, exp["sample"], exp["timestep"], exp["encoder_hidden_states"])
            te_out = pipe.text_encoder(input_ids=exp["te_input_ids"]).last_hidden_state.float()
        unet_err = (unet_out - exp["unet_out_kohya"]).abs().max().item()
        te_err = (te_out - exp["te_out_kohya"]).abs().max().item()
        assert unet_err <= TOLERANCE and te_err <= TOLERANCE, (path, unet_err, te_err)
        with safe_open(str(path), "pt") as f:
            keys = sorted(f.keys())
            metadata = f.metadata() or {}
        verdict[fmt] = {
            "keys": keys,
            "metadata_keys": sorted(metadata),
            "unet_max_abs_err": unet_err,
            "te_max_abs_err": te_err,
            "loader_complaints": bad,
        }
        print(f"{cfg} {fmt}: {len(keys)} tensors loaded cleanly; max err unet {unet_err:.2e}, te {te_err:.2e}")
    return verdict


def main():
    ours_dir = Path(sys.argv[1]).resolve()
    for cfg in ("sd1-tiny", "sd2-tiny"):
        verdict = check(cfg, ours_dir)
        (FIXTURES / cfg / "ours_checked.json").write_text(json.dumps(verdict, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
