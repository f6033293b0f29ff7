"""``refldm grid``: the web UI's X/Y/Z plot, here, in local processes or on a Dask cluster (refldm/grid/).

    refldm grid -p "a red circle" --x "sampler=Euler a,DPM++ 2M Karras" --y "steps=10,20" --z "cfg=3,7" -o grid/
    refldm grid -p "a red circle" --x "seed=1,2,3,4" --workers 2 -o seeds/          # two local processes
    refldm grid -p "a red circle" --x "seed=1,2,3,4" --cluster tcp://10.0.0.5:8786 -o seeds/   # a Dask scheduler
    refldm grid -p "a red circle" --x "seed=1,2,3,4" --cluster local:2 -o seeds/    # a LocalCluster of 2
    refldm grid ... --resume                  # keep the cells already written with the same settings

Axis kinds: sampler, steps, cfg, seed, prompt (search / replace), lora (--lora FILE's scale), size (WxH),
denoise (-i IMAGE's strength, or --hires-scale's), clip_skip, checkpoint, dtype, accel (speed | reference),
rng (cpu | cuda). docs/scale-out.md: running on several machines.
"""

from __future__ import annotations

import functools
import sys

from refldm.cli.common import add_model_args, check_text, load_pipeline, resolve_defaults


def register(subparsers) -> None:
    p = subparsers.add_parser("grid", help="an X/Y/Z grid of settings (here, --workers N, or --cluster ADDRESS)",
                              description="Generate one image per combination of up to three axes of settings, "
                                          "with a labelled grid image and a JSON manifest, in this process, in "
                                          "local processes or on a Dask cluster; the same bytes however it runs.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt every cell starts from")
    p.add_argument("-n", "--negative", default=None, help="the negative prompt (default: none)")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}", default=None, metavar="KIND=V1,V2",
                       help=f"the {axis} axis: sampler, steps, cfg, seed, prompt, lora, size, denoise, clip_skip, "
                            "checkpoint, dtype, accel, rng" if axis == "x" else f"the {axis} axis")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 25 for the built-in model)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 7.5; 3 for the built-in model)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every cell (default 0)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's own)")
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of 8")
    p.add_argument("-H", "--height", type=int, default=None, help="image height, a multiple of 8")
    p.add_argument("--lora", default=None, metavar="FILE[:SCALE]", help="a LoRA for every cell (a lora axis "
                                                                         "sets its scale)")
    p.add_argument("--clip-skip", type=int, default=None, help="diffusers' clip_skip for every cell")
    p.add_argument("--rng", default=None, metavar="cpu|cuda", help="the web UI's noise source (default: diffusers')")
    p.add_argument("-i", "--image", default=None, help="img2img: the input image (--strength, or a denoise axis)")
    p.add_argument("--strength", type=float, default=None, help="img2img strength / hires denoise (default 0.75)")
    p.add_argument("--hires-scale", type=float, default=None, help="the hires fix's scale for every cell")
    p.add_argument("-o", "--output", default="refldm-grid", help="the output folder (default refldm-grid)")
    p.add_argument("--resume", action="store_true", help="keep the cells already in the folder with the same "
                                                         "settings; refuse a folder holding other ones")
    p.add_argument("--yes", action="store_true", help="run a grid of more than 100 cells")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N", help="run the cells in N local processes")
    where.add_argument("--cluster", default=None, metavar="ADDRESS",
                       help="a dask.distributed scheduler (tcp://HOST:8786) or local:N (a LocalCluster of N "
                            "processes); needs pip install 'refldm[cluster]'")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for --cluster's scheduler (10)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_grid)


def _spec(args):
    """The GridSpec of the flags. --reference (or REFLDM_ACCEL=0) is a setting of every cell, applied in each
    worker; otherwise the workers run as their environment says (the speed layer by default)."""
    from refldm.cli.adapters import parse_lora_flag
    from refldm.grid import GridSpec
    check_text(args.prompt, "--prompt")
    check_text(args.negative, "--negative")
    resolve_defaults(args)
    lora, scale = parse_lora_flag(args.lora) if args.lora else (None, 1.0)
    return GridSpec(args.prompt, x=args.x, y=args.y, z=args.z, negative=args.negative, model=args.model,
                    dtype=args.dtype, steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler,
                    width=args.width, height=args.height, lora=lora, lora_scale=scale, clip_skip=args.clip_skip,
                    rng=args.rng, accel=None if args.accel_on() else False, image=args.image, denoise=args.strength,
                    hires_scale=args.hires_scale, out=args.output)


def run_grid(args) -> int:
    from refldm import grid
    from refldm.grid import executors
    spec = _spec(args)
    if args.backend:
        raise ValueError("--backend: refldm grid runs on the host (NumPy)")
    grid.plan(spec, resume=args.resume, yes=args.yes)  # every check before a cluster starts
    loader = functools.partial(load_pipeline, config=args.config, tokenizer=args.tokenizer,
                               prediction_type=args.prediction_type, max_length=args.max_length)
    client = cluster = None
    if args.cluster:
        client, cluster = executors.connect(args.cluster, args.timeout, args.worker_env)
    try:
        manifest = grid.run(spec, client=client, workers=args.workers, resume=args.resume, yes=args.yes,
                            progress=not args.quiet, loader=loader, accel_switch=args.accel_switch,
                            worker_env=args.worker_env)
    finally:
        if client is not None:
            executors.close(client, cluster)
    cells = manifest["cells"]
    failed = [c for c in cells if c["status"] == "failed"]
    for c in failed:
        print(f"refldm: cell {c['file']} ({', '.join(c['labels'])}) failed: {c['error']}", file=sys.stderr)
    resumed = sum(c["status"] == "resumed" for c in cells)
    print(f"wrote {args.output}: {len(cells) - len(failed)} of {len(cells)} cells"
          + (f" ({resumed} resumed)" if resumed else "") + f", {', '.join(manifest['grids'])}, manifest.json "
          f"({manifest['seconds']:.1f} s, {manifest['executor']})")
    return 1 if failed else 0
