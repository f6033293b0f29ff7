"""`refldm explain`: one self-contained HTML page showing a generation from noise to image.

    refldm explain -p "a large red circle in the center on a white background" -o explain.html
    refldm explain -p "a photo of a cat" -m path/to/sd-folder --steps 20 --cfg 7.5 --token 4 -o cat.html

The page and what it shows: refldm/analysis/explain.py and docs/watching-the-loop.md. Argument parsing and
printing only.
"""

from __future__ import annotations

from refldm.cli.common import check_cfg, check_seed, check_steps, check_text, sampler_name, use_backend

__all__ = ["register", "run_explain"]


def register(subparsers) -> None:
    from refldm.analysis.explain import DEFAULT_CFG, DEFAULT_STEPS
    p = subparsers.add_parser("explain", help="write one HTML page that shows a generation step by step",
                              description="Generate one image with everything recorded and write a self-contained "
                                          "HTML page: sizes and cost, the schedule, every step's latents and "
                                          "predictions, the attention map of each prompt token, the image.")
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("-n", "--negative", default="", help="the negative prompt (default empty)")
    p.add_argument("-m", "--model", default=None,
                   help="an SD 1.x / 2.x, SDXL, SD3 or FLUX diffusers folder, or a .safetensors file (default: the "
                        "built-in model)")
    p.add_argument("-o", "--output", default="explain.html", help="the page to write (default explain.html)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"guidance scale (default {DEFAULT_CFG:g})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--sampler", default=None, type=sampler_name, help="sampler by name (default: the model's)")
    p.add_argument("-W", "--width", type=int, default=None, help="image width (default: the model's size)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height")
    p.add_argument("--token", type=int, action="append", default=None, metavar="I",
                   help="map only prompt token I (1 = the first; repeat for several; default all)")
    p.add_argument("--decoder", choices=("vae", "linear"), default="vae",
                   help="how each step's latents are drawn: the VAE (default) or the linear latent-to-RGB map")
    p.add_argument("--config", default=None, help="a single file's diffusers config folder")
    p.add_argument("--tokenizer", default=None, help="a single file's CLIP tokenizer folder")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None)
    p.set_defaults(func=run_explain)


KINDS = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def _load(args):
    """The text-to-image pipeline of -m (a FLUX folder too), refused naming it when explain cannot take it."""
    import os
    from refldm.cli.common import load_pipeline
    from refldm.pipelines.flux import FluxPipeline, is_flux_folder
    if args.model is not None and os.path.isdir(args.model) and is_flux_folder(args.model):
        pipe = FluxPipeline.from_pretrained(args.model, dtype=args.dtype)
    else:
        pipe = load_pipeline(args.model, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype)
    if type(pipe).__name__ not in KINDS:
        raise ValueError(f"{args.model}: a {type(pipe).__name__}; explain takes SD 1.x / 2.x, SDXL, SD3 and FLUX "
                         "text-to-image models")
    if args.decoder == "linear":
        from refldm.models.latent_rgb import family_of
        try:
            family_of(pipe.vae.config, pipe.name)
        except ValueError as e:
            raise ValueError(f"--decoder linear: {e}".replace("preview='vae'", "--decoder vae")) from None
    return pipe


def run_explain(args) -> int:
    from refldm.analysis.explain import explain, write_html
    from refldm.cli.common import one_line_warnings
    from refldm.core.images import check_output
    check_text(args.prompt, "--prompt")
    check_text(args.negative, "--negative")
    check_steps(args.steps)
    check_cfg(args.cfg)
    check_seed(args.seed)
    path = check_output(args.output, (".html", ".htm"), what="page")
    use_backend(args.backend)
    with one_line_warnings():
        pipe = _load(args)
        ex = explain(pipe, args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                     guidance_scale=args.cfg, seed=args.seed, sampler=args.sampler, tokens=args.token,
                     decoder=args.decoder, height=args.height, width=args.width)
    size = write_html(ex, path)
    for note in ex.notes:
        print(f"note: {note}")
    maps = len(ex.shown_tokens) if ex.attention else 0      # SD3 / FLUX: no maps (the page says why)
    print(f"wrote {path} ({size / 1e6:.2f} MB; {ex.steps} steps, {maps} token maps, "
          f"{ex.cost['run_s']:.1f} s)")
    return 0
