"""``refldm trace`` and ``refldm compare``: record every layer of a model, and compare two recordings.

    refldm trace MODEL --part unet --dtype float64 -o golden.safetensors
    refldm trace MODEL --part unet --inputs golden.safetensors -o mine.safetensors   # float32, same inputs
    refldm compare mine.safetensors golden.safetensors --rtol 1e-4

The trace file is a plain safetensors file (see `refldm.crosscheck.trace`); docs/crosscheck.md shows the workflow.
"""

from __future__ import annotations

import os

from refldm.crosscheck import trace


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="record every layer's output of a model part into a safetensors trace file",
        description="Run one part of a model folder with tracing on and write every module's output, "
                    "named by its checkpoint key prefix, to a safetensors file (inputs and config in it).")
    p.add_argument("model_folder", nargs="?", default=None, help="a diffusers pipeline folder, or the part's "
                   "own folder (unet/, vae/, ...); default: the built-in model")
    p.add_argument("--part", required=True, choices=list(trace.PARTS) + ["pipeline"],
                   help="what to run: the U-Net (SD3: the transformer), the VAE encoder or decoder, a text "
                        "encoder, or the whole pipeline (per-step latents, noise predictions and guidance outputs too)")
    p.add_argument("-o", "--output", required=True, help="the trace file to write (.safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"],
                   help="compute dtype (float64 gives golden references; default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--inputs", metavar="TRACE", help="take the inputs from this trace file instead of random ones")
    p.add_argument("--batch", type=int, default=1, help="batch size of random inputs (default 1)")
    p.add_argument("--height", type=int, help="height of the part's input array: latent pixels for unet and "
                   "vae-decode, image pixels for vae-encode and pipeline (default from the config)")
    p.add_argument("--width", type=int, help="width, likewise")
    p.add_argument("--seq-len", type=int, help="tokens of encoder_hidden_states (unet) or input_ids (text-encoder)")
    p.add_argument("--timestep", type=float, default=500.0, help="the U-Net's timestep (default 500)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="record only names matching this glob (repeatable), e.g. 'down_blocks.*' to save memory")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse",
                   help="pipeline only: the prompt")
    p.add_argument("--negative-prompt", default=None, help="pipeline only: the negative prompt")
    p.add_argument("--steps", type=int, default=4, help="pipeline only: sampler steps (default 4)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="pipeline only: CFG scale (default 7.5)")
    p.add_argument("--sampler", "--scheduler", dest="sampler", default=None,
                   help="pipeline only: sampler by name, as for txt2img (`refldm samplers`; default: the folder's)")
    p.set_defaults(func=run_trace)

    c = subparsers.add_parser(
        "compare", help="compare two trace files layer by layer",
        description="Per layer, the max absolute and relative error (max|a-b|/max|b|, B the reference); "
                    "marks the first layer over --rtol; summarises. Exit status 1 if any layer is over it.")
    c.add_argument("a", help="the trace to check (.safetensors)")
    c.add_argument("b", help="the reference trace (.safetensors), e.g. a float64 golden trace")
    c.add_argument("--rtol", type=float, default=1e-4, help="tolerance on the relative error (default 1e-4)")
    c.add_argument("--names", action="append", metavar="GLOB", help="compare only names matching this glob")
    c.add_argument("--summary", action="store_true", help="print only the summary, not every layer")
    c.set_defaults(func=run_compare)


# The largest value each size option takes (a trace keeps every layer's output in memory: far beyond
# these, no machine holds it; the estimate below refuses what this machine cannot hold before any work).
LIMITS = {"batch": 256, "height": 4096, "width": 4096, "seq_len": 16384, "steps": 1000}


def run_trace(args) -> int:
    import math

    if args.model_folder is None:
        from refldm.about import DEFAULT_MODEL
        args.model_folder = DEFAULT_MODEL

    from refldm.cli.resources import available_memory
    for name, limit in LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and not 1 <= value <= limit:
            raise ValueError(f"--{name.replace('_', '-')} must lie in 1..{limit}, got {value}")
    if not math.isfinite(args.timestep):
        raise ValueError(f"--timestep must be a finite number, got {args.timestep}")
    if not args.output.lower().endswith(".safetensors"):
        raise ValueError(f"{args.output}: a trace is a safetensors file; name it *.safetensors")
    # rough lower bound of what the trace holds: every layer's output is at least the input array
    values = args.batch * (args.height or 64) * (args.width or 64) * max(args.seq_len or 77, 1)
    need = values * {"float16": 2, "float32": 4, "float64": 8}[args.dtype]
    have = available_memory()
    if have and need > have:
        raise ValueError(f"--batch {args.batch} with these sizes needs at least {need / 2**30:.1f} GiB for the "
                         f"inputs alone; this machine has {have / 2**30:.1f} GiB available")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"{args.output}: folder {out_dir} does not exist")
    if args.part == "pipeline":
        t = trace.trace_pipeline(args.model_folder, prompt=args.prompt, negative_prompt=args.negative_prompt,
                                 steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                 height=args.height, width=args.width, dtype=args.dtype,
                                 scheduler=args.sampler, include=args.include)
    else:
        inputs = trace.load(args.inputs).inputs if args.inputs else None
        t = trace.trace_part(args.model_folder, args.part, dtype=args.dtype, inputs=inputs, include=args.include,
                             seed=args.seed, batch=args.batch, height=args.height, width=args.width,
                             seq_len=args.seq_len, timestep=args.timestep)
    trace.save_trace(args.output, t)
    print(f"wrote {len(t.activations)} activations of {args.part} ({args.dtype}) to {args.output}")
    return 0


def run_compare(args) -> int:
    import math

    from refldm.crosscheck.compare import compare
    if not (math.isfinite(args.rtol) and args.rtol > 0):
        raise ValueError(f"--rtol must be a finite number > 0, got {args.rtol}")

    result = compare(args.a, args.b, rtol=args.rtol, names=args.names)
    if not result.rows:
        raise ValueError(f"{args.a} and {args.b} share no activation names; nothing to compare")
    print(result.summary() if args.summary else result)
    return 0 if result.ok else 1
