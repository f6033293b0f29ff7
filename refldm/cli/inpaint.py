"""``refldm inpaint -i IN.png --mask MASK.png -p PROMPT -o out.png``: repaint the white part of the mask.

The model may be an inpainting model (9-channel U-Net) or an ordinary one (masked blending each step);
refldm/pipelines/inpaint.py explains both. The PNG gets the web UIs' parameters text, as txt2img's.
"""

from __future__ import annotations


from refldm.cli import common
from refldm.cli.adapters import add_adapter_args, apply_adapter_args
from refldm.cli.generate import add_noise_args, noise_kwargs


def register(subparsers) -> None:
    p = subparsers.add_parser("inpaint", help="repaint the masked part of an image under a prompt",
                              description="Repaint where the mask is white (>= 128) and keep the rest; works "
                                          "with inpainting models (9-channel U-Net) and ordinary ones.")
    common.add_model_args(p)
    p.add_argument("-i", "--image", required=True, help="input image (its sides must be multiples of 8)")
    p.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep (resized and "
                                                 "converted to grey if needed)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="1 repaints from pure noise (default); lower keeps more of the image under the mask")
    p.add_argument("--padding-mask-crop", type=int, default=None, metavar="PIXELS",
                   help="inpaint only the box around the mask, grown by PIXELS, at full resolution, then paste it back")
    common.add_generation_args(p, default_output="refldm-inpaint.png")
    add_adapter_args(p)
    add_noise_args(p, hires=False)  # --rng, --ensd, --variation-seed, ... (refldm/cli/generate.py)
    p.set_defaults(func=run_inpaint)


def _open(path, what):
    from refldm.core.images import open_image
    return open_image(path, what)  # missing, unreadable or decompression-bomb files: one line


def run_inpaint(args) -> int:
    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must lie in (0, 1], got {args.strength}")
    from refldm.core.images import check_output
    common.check_generation_args(args)
    noise = noise_kwargs(args)
    common.resolve_defaults(args)
    path = check_output(args.output or "refldm-inpaint.png")  # before the work, not after
    image = _open(args.image, "image").convert("RGB")
    mask = _open(args.mask, "mask")
    common.use_backend(args.backend)
    with common.one_line_warnings():
        base = common.load_pipeline(args.model, config=args.config, tokenizer=args.tokenizer,
                                      prediction_type=args.prediction_type, dtype=args.dtype,
                                    max_length=args.max_length)
        pipe = StableDiffusionInpaintPipeline(base.vae, base.text_encoder, base.tokenizer, base.unet,
                                              base.scheduler_config, base.configs, name=base.name, dtype=args.dtype)
        pipe.checkpoint_path = base.checkpoint_path  # its Model hash
        prompt, kwargs = apply_adapter_args(args, pipe)
        common.warn_run_choices(args, pipe, image.height, image.width)
        common.check_resources(pipe, 1, image.height, image.width, args.steps, args.cfg, strength=args.strength)
        out = pipe(prompt, image=image, mask_image=mask, negative_prompt=args.negative, strength=args.strength,
                   padding_mask_crop=args.padding_mask_crop, num_inference_steps=args.steps,
                   guidance_scale=args.cfg, seed=args.seed, sampler=args.sampler, progress=not args.quiet, **kwargs,
                   **noise)
    img = out.images[0]
    text = out.generation[0].replace(prompt=args.prompt).text()  # the pipeline's, with the prompt as typed
    common.save_png(img, path, text)
    print(f"wrote {path} ({img.width}x{img.height}, seed {out.seed}, {args.steps} steps, "
          f"denoise {out.timings.get('denoise', 0):.2f} s)")
    return 0
