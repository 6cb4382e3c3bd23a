"""What `lora-infer` does, with diffusers: load a Stable Diffusion folder, generate one image with
DDIM and classifier-free guidance, save it as a PNG. `benches/run_infer_command.sh` times this
whole process (imports and load included) beside the same `lora-infer` command.

    python benches/infer_reference.py FOLDER OUTPUT.png --width W --height H --steps N
                                      [--guidance G] [--seed S] [--prompt TEXT]
"""

import argparse

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("output")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    args = parser.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(
        args.folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    # lora-infer's default scheduler, over the model's own schedule.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        image = pipe(
            args.prompt,
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
        ).images[0]
    image.save(args.output)


if __name__ == "__main__":
    main()
