#!/usr/bin/env python3
"""Reference fixtures for lora-infer: whole-pipeline runs and scheduler steps, from diffusers.

Reads the tiny model folders that make_fixtures.py wrote (tests/fixtures/{sd1-tiny,sd2-tiny}) and
writes, per folder, tests/fixtures/<cfg>/infer/:

- pipeline.safetensors + pipeline.json: StableDiffusionPipeline (the folder's DDIMScheduler, eta 0,
  classifier-free guidance) from given initial latents, with output_type="latent" so the final
  latents come back before the division by the VAE scaling factor. Cases: the base model; the
  kohya adapter at scale 1.0 (UNet and text encoder); the two PEFT adapters at weights 0.5 and 0.7
  (set_adapters). The base case also records the decoded image (before clamping).
- schedulers.safetensors + schedulers.json (sd1-tiny only; the schedule is the same for both):
  set_timesteps(n) and every step() of DDIM, Euler, Euler ancestral, DPM-Solver++(2M) and DDPM on
  fixed model outputs, for epsilon and v-prediction and each timestep spacing. The stochastic
  schedulers' noise is recorded by replaying the generator state before each step.

Nothing is typed in by hand: every expected value comes from diffusers.

Usage: python tests/reference/make_infer_fixtures.py [--fixtures tests/fixtures]
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20240605
PROMPT = "a red circle on a white background"
NEGATIVE_PROMPT = "blurry, low quality"
STEPS = 6
GUIDANCE = 7.5
NUM_IMAGES = 2
STRENGTH = 0.6
SCHEDULER_STEPS = 5
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
}


def log(*a):
    print(*a, flush=True)


def load_pipeline(folder: Path, fixtures: Path) -> StableDiffusionPipeline:
    if (folder / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    else:
        # sd2-tiny has no tokenizer folder (the Rust side uses the embedded CLIP vocabulary, the
        # same one). SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), which the text encoder's
        # pad_token_id = 0 also says.
        tokenizer = CLIPTokenizer.from_pretrained(str(fixtures / "sd1-tiny" / "tokenizer"), pad_token="!")
        assert tokenizer.pad_token_id == 0
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), tokenizer=tokenizer, safety_checker=None, local_files_only=True
    )
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, init_latents):
    with torch.no_grad():
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            num_images_per_prompt=NUM_IMAGES,
            latents=init_latents.clone(),
            output_type="latent",
        )
    return out.images.float()


def img2img(pipe, out, shape):
    """img2img from 4-channel latents (diffusers then skips the VAE), strength STRENGTH."""
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(SEED + 3)
    image_latents = torch.randn(1, *shape[1:], generator=g)
    seed = SEED + 4
    # The only draw prepare_latents makes for latent input: the noise added at the start step.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    with torch.no_grad():
        final = i2i(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            image=image_latents.clone(),
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            num_images_per_prompt=NUM_IMAGES,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images.float()
    out["img2img.image_latents"] = image_latents
    out["img2img.noise"] = noise
    out["img2img.final_latents"] = final


def pipeline_fixtures(name: str, fixtures: Path):
    folder = fixtures / name
    out_dir = folder / "infer"
    out_dir.mkdir(exist_ok=True)
    pipe = load_pipeline(folder, fixtures)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * factor
    g = torch.Generator().manual_seed(SEED)
    init = torch.randn(NUM_IMAGES, pipe.unet.config.in_channels, size // factor, size // factor, generator=g)
    out = {"init_latents": init}

    base = run(pipe, init)
    out["base.final_latents"] = base
    img2img(pipe, out, init.shape)
    with torch.no_grad():
        out["base.image"] = pipe.vae.decode(base / pipe.vae.config.scaling_factor).sample.float()

    pipe.load_lora_weights(str(folder), weight_name="adapter_kohya.safetensors", adapter_name="kohya")
    pipe.set_adapters(["kohya"], [1.0])
    out["kohya.final_latents"] = run(pipe, init)
    pipe.delete_adapters(["kohya"])
    assert torch.equal(run(pipe, init), base), "deleting the adapter did not restore the base model"

    pipe.load_lora_weights(str(folder), weight_name="adapter_two_a_peft.safetensors", adapter_name="a")
    pipe.load_lora_weights(str(folder), weight_name="adapter_two_b_peft.safetensors", adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.7])
    out["two.final_latents"] = run(pipe, init)

    for case in ("base", "kohya", "two"):
        d = (out[f"{case}.final_latents"] - base).abs().max().item()
        log(f"  {name} {case}: max|final - base| = {d:.4f}, max|final| = {out[f'{case}.final_latents'].abs().max():.3f}")
        assert case == "base" or d > 1e-2, f"{case}: the adapter has no visible effect"

    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "pipeline.safetensors"), metadata={"format": "pt"})
    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "eta": 0.0,
        "num_images": NUM_IMAGES,
        "width": size,
        "height": size,
        "scheduler": "the folder's DDIMScheduler",
        "prediction_type": pipe.scheduler.config.prediction_type,
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "cases": {
            "base": [],
            "kohya": [["adapter_kohya.safetensors", 1.0]],
            "two": [["adapter_two_a_peft.safetensors", 0.5], ["adapter_two_b_peft.safetensors", 0.7]],
        },
        "img2img": {"strength": STRENGTH, "image": "img2img.image_latents (4 channels: used as latents)",
                    "noise": "img2img.noise, the generator's draw in prepare_latents"},
        "notes": [
            "init_latents are passed as latents= (diffusers multiplies them by init_noise_sigma)",
            "final_latents: output_type='latent', before division by the VAE scaling factor",
            "base.image: vae.decode(base.final_latents / scaling_factor), before clamping",
        ],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out_dir / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")


def scheduler_fixtures(fixtures: Path):
    folder = fixtures / "sd1-tiny"
    out_dir = folder / "infer"
    base_config = dict(DDIMScheduler.from_pretrained(str(folder / "scheduler")).config)
    g = torch.Generator().manual_seed(SEED + 1)
    shape = (1, 4, 4, 4)
    model_outputs = torch.randn(SCHEDULER_STEPS, *shape, generator=g)
    start = torch.randn(*shape, generator=g)
    out = {"model_outputs": model_outputs, "start": start}
    cases = []
    for prediction_type in ("epsilon", "v_prediction"):
        for spacing in ("leading", "linspace", "trailing"):
            for name, cls in SCHEDULERS.items():
                config = dict(base_config, prediction_type=prediction_type, timestep_spacing=spacing)
                sched = cls.from_config(config)
                sched.set_timesteps(SCHEDULER_STEPS)
                key = f"{name}.{prediction_type}.{spacing}"
                noise_gen = torch.Generator().manual_seed(SEED + 2)
                sample = start * sched.init_noise_sigma
                inputs, prevs, noises = [], [], []
                for i, t in enumerate(sched.timesteps):
                    inputs.append(sched.scale_model_input(sample, t))
                    # The noise step() will draw: a replay of the generator from its current state.
                    replay = torch.Generator().set_state(noise_gen.get_state())
                    noises.append(torch.randn(shape, generator=replay, dtype=torch.float32))
                    sample = sched.step(model_outputs[i], t, sample, generator=noise_gen).prev_sample
                    prevs.append(sample)
                # img2img's start: noise added at step 2, with the begin index set as the pipeline does.
                fresh = cls.from_config(config)
                fresh.set_timesteps(SCHEDULER_STEPS)
                if hasattr(fresh, "set_begin_index"):
                    fresh.set_begin_index(2)
                out[f"{key}.add_noise_2"] = fresh.add_noise(start, noises[0], fresh.timesteps[2:3]).float()
                out[f"{key}.timesteps"] = sched.timesteps.to(torch.float64)
                out[f"{key}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
                if hasattr(sched, "sigmas"):
                    out[f"{key}.sigmas"] = sched.sigmas.to(torch.float64)
                out[f"{key}.model_inputs"] = torch.stack(inputs).float()
                out[f"{key}.prev_samples"] = torch.stack(prevs).float()
                out[f"{key}.noise"] = torch.stack(noises)
                cases.append(key)
                log(f"  {key}: timesteps {sched.timesteps.tolist()}")
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "schedulers.safetensors"), metadata={"format": "pt"})
    meta = {
        "steps": SCHEDULER_STEPS,
        "base_config": "sd1-tiny/scheduler/scheduler_config.json with prediction_type and timestep_spacing overridden",
        "classes": {name: cls.__name__ for name, cls in SCHEDULERS.items()},
        "cases": cases,
        "notes": [
            "sample_0 = start * init_noise_sigma; step i: model_inputs[i] = scale_model_input(sample_i, t_i), "
            "sample_{i+1} = prev_samples[i] = step(model_outputs[i], t_i, sample_i, generator)",
            "noise[i] is the standard-normal tensor step i draws (unused by deterministic schedulers)",
        ],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out_dir / "schedulers.json").write_text(json.dumps(meta, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(REPO_ROOT / "tests" / "fixtures"))
    args = ap.parse_args()
    fixtures = Path(args.fixtures)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    for name in ("sd1-tiny", "sd2-tiny"):
        pipeline_fixtures(name, fixtures)
    scheduler_fixtures(fixtures)
    for p in sorted(fixtures.glob("*/infer/*")):
        log(f"  {p.stat().st_size:>8}  {p.relative_to(fixtures)}")


if __name__ == "__main__":
    main()
