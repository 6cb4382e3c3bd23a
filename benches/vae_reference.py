"""The vae benchmark cases measured with diffusers' AutoencoderKL (PyTorch), printing the same JSON.

    python benches/vae_reference.py <decode-32|decode-64|encode-256|encode-512> [--iters N]

The SD 1.5 VAE configuration with random weights, f32, batch 1, one warm-up run then the timed
ones, as benches/vae.rs; encode returns the latent distribution's mean (what lora-train caches).
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

# The SD 1.5 VAE's configuration, kept once for the reference scripts.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reference"))
from check_full_size import VAE as SD15_VAE  # noqa: E402
from reference_timing import print_report, time_runs  # noqa: E402


def main():
    args = sys.argv[1:]
    case = args[0]
    iters = int(args[args.index("--iters") + 1]) if "--iters" in args else 3
    encode, size = {"decode-32": (False, 32), "decode-64": (False, 64),
                    "encode-256": (True, 256), "encode-512": (True, 512)}[case]
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval()
    vae.requires_grad_(False)
    x = torch.randn(1, 3 if encode else 4, size, size)

    def run():
        with torch.inference_mode():
            out = vae.encode(x).latent_dist.mean if encode else vae.decode(x).sample
            out.float().sum().item()

    times = time_runs(run, iters)
    print_report(case, f"diffusers {__import__('diffusers').__version__} (torch {torch.__version__})",
                 times)


if __name__ == "__main__":
    main()
