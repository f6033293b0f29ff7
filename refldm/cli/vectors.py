"""``refldm vectors`` and ``refldm verify``: conformance bundles for porters, and scoring a port against one.

    refldm vectors MODEL --out bundle/                 # float64 goldens of every part of a diffusers folder
    refldm vectors --tiny sd15 --out tiny-sd15/        # a tiny random-weight model, its weights included
    refldm vectors --tiny sd3 --out tiny-sd3/          # SD3 / SD3.5 (and --tiny flux): MMDiT, T5, flow schedulers
    refldm vectors --candidate bundle/ --out mine.safetensors   # refldm itself (float32) as a candidate
    refldm vectors MODEL --candidate bundle/ --out mine.safetensors   # ... of a bundle without weights
    refldm verify bundle/ mine.safetensors [--names original | --map names.json] [--json] [--report r.html]
    refldm vectors MODEL_A MODEL_B --out bundles/ --workers 2   # one bundle each, bundles/MODEL_A, ...; or
    refldm vectors --tiny sd15,sdxl --out bundles/ --cluster tcp://HOST:8786   # on Dask (docs/scale-out.md)

docs/porting.md shows the workflow; `refldm.crosscheck.vectors` and `refldm.crosscheck.verify` hold the code.
"""

from __future__ import annotations

import json
import os
import warnings

from refldm.crosscheck import vectors


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vectors", help="write a conformance bundle: golden inputs and outputs of every part of a model",
        description="Run every part of a model in float64 on fixed inputs and write each layer's output, with "
                    "its inputs, tolerances and provenance, as manifest.json + safetensors files (docs/porting.md).")
    p.add_argument("model", nargs="*", help="a diffusers model folder (not with --tiny; with --candidate: the model "
                                            "to run, default the bundle's own weights); several: one bundle each, "
                                            "OUT/NAME")
    p.add_argument("--out", "-o", required=True, help="the bundle folder to write (or, with --candidate, the "
                                                      "candidate .safetensors file)")
    p.add_argument("--tiny", type=_tiny_kinds, default=[], metavar="KIND[,KIND]",
                   help="build refldm's tiny random-weight model of this architecture (fixed seed, no download) "
                        f"and bundle it with its weights: {', '.join(TINY)}; several: one bundle each, OUT/tiny-KIND")
    _add_many_arguments(p)
    p.add_argument("--parts", help=f"comma-separated parts to include (default all: {','.join(vectors.PARTS)})")
    p.add_argument("--dtype", choices=["float64", "float32"], default=None,
                   help="dtype of the goldens (default float64); with --candidate, refldm's compute dtype "
                        "(default float32)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 8 latent pixels; 16 for --tiny)")
    p.add_argument("--steps", type=int, help="sampler steps of the scheduler and pipeline cases (default 4; 3 "
                                             "for --tiny)")
    p.add_argument("--max-sequence-length", type=int, metavar="N", help="SD3 / FLUX: T5's token count (default: "
                   "the pipeline's, 256 for SD3 and 512 for FLUX; 32 for --tiny)")
    p.add_argument("--prompts", metavar="FILE", help="the prompt suite: a JSON list of strings, or a text file "
                                                     "with one prompt per line (default: refldm's hard suite)")
    p.add_argument("--detail", choices=["all", "blocks"], help="record every module ('all', default for --tiny) "
                   "or blocks, resnets and attentions only ('blocks', default for a full model)")
    p.add_argument("--candidate", metavar="BUNDLE", help="instead: run refldm on BUNDLE's inputs and write its "
                   "outputs as a candidate file (what `refldm verify` scores)")
    # the reference ops alone, as --reference: the speed layer picks its kernels by machine, and a bundle must
    # not depend on the machine (refldm/cli/__init__.py's main applies it)
    p.set_defaults(func=run_vectors, reference_ops=True)

    v = subparsers.add_parser(
        "verify", help="score a port's outputs against a conformance bundle",
        description="Per case, in data-flow order: max abs and relative error against the case's tolerance; "
                    "pass / FAIL / not provided; the first failing case. Exit 0: every case provided passes; "
                    "1: a case fails; 2: the bundle or the candidate is unreadable.")
    v.add_argument("bundle", help="the bundle folder (refldm vectors --out)")
    v.add_argument("candidate", help="the port's outputs: a .safetensors file, an .npz, or a folder of .npy files")
    v.add_argument("--names", choices=["diffusers", "original"], default="diffusers",
                   help="how the candidate names its tensors: as the cases (default) or by original key prefix")
    v.add_argument("--map", metavar="FILE", help="a JSON object {candidate name: case name} ('*' in both for "
                                                 "the same text) for a port's own names")
    v.add_argument("--group", metavar="GROUP", help="the candidate is one pass, named without the group: a trace "
                   "file of `refldm trace` or tools/trace_diffusers.py (e.g. --group unet.t500.cond)")
    v.add_argument("--precision", choices=["float32", "float16", "float64"], default="float32",
                   help="which tolerance column applies: the precision the port computes in (default float32)")
    v.add_argument("--summary", action="store_true", help="print only the counts and the first failing case")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--report", metavar="FILE", help="also write a self-contained HTML page with a plot of the "
                                                    "error along the network")
    v.set_defaults(func=run_verify)


TINY = ("sd15", "sd2-v", "sdxl", "sdxl-refiner", "inpaint", "sd3", "flux")


def _tiny_kinds(value) -> list:
    import argparse
    kinds = [k.strip() for k in value.split(",")]
    bad = [k for k in kinds if k not in TINY]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown tiny kind {bad[0]!r}; choose from {', '.join(TINY)}")
    return kinds


# ---------------------------------------------------------------------------------------------------------------
# several bundles at once, through the grid's executors (refldm/grid/bundles.py)


def _add_many_arguments(p) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N", help="several bundles: in N local processes")
    where.add_argument("--cluster", default=None, metavar="ADDRESS", help="several bundles: on a dask.distributed "
                       "scheduler, or local:N (OUT must be a folder every worker reaches; docs/scale-out.md)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for --cluster's scheduler (10)")


def _run_many(args, kwargs) -> int:
    """MODEL... / --tiny K1,K2: one bundle each in OUT/NAME, through the grid's executors; 1 if one fails."""
    from refldm.grid import executors
    from refldm.grid.bundles import run_bundles
    if args.candidate:
        raise ValueError("--candidate takes one model; run it once per bundle")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"{args.out}: exists and is not a folder")
    jobs = [{"model": m, "out": os.path.join(args.out, os.path.basename(os.path.normpath(m))), **kwargs}
            for m in args.model]
    jobs += [{"tiny": k, "out": os.path.join(args.out, f"tiny-{k}"), **kwargs, "detail": args.detail or "all"}
             for k in args.tiny]
    os.makedirs(args.out, exist_ok=True)
    client = cluster = None
    if args.cluster:
        client, cluster = executors.connect(args.cluster, args.timeout, args.worker_env)
    try:
        records = run_bundles(jobs, client=client, workers=args.workers, progress=False,
                              accel_switch=args.accel_switch,  # reference ops in every worker (main's hook)
                              worker_env=args.worker_env)
    finally:
        if client is not None:
            executors.close(client, cluster)
    for r in records:
        print(f"{r['out']}: {r['cases']} cases ({r['seconds']:.1f} s)" if r["status"] == "ok"
              else f"refldm: {r['out']}: failed: {r['error']}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def _read_prompts(path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the prompt file is not UTF-8 text") from None
    if path.endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = text.split("\n")
        if prompts and prompts[-1] == "":
            prompts.pop()
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def run_vectors(args) -> int:
    for name in ("size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if len(args.model) + len(args.tiny) > 1 or args.workers or args.cluster:  # several bundles (_run_many)
        kwargs = {"parts": args.parts.split(",") if args.parts else None, "dtype": args.dtype, "size": args.size,
                  "steps": args.steps, "prompts": _read_prompts(args.prompts) if args.prompts else None,
                  "detail": args.detail or "blocks", "max_sequence_length": args.max_sequence_length}
        return _run_many(args, kwargs)
    args.model = args.model[0] if args.model else None
    args.tiny = args.tiny[0] if args.tiny else None
    if args.candidate:
        if args.tiny:
            raise ValueError("--candidate runs refldm on a bundle's inputs; --tiny does not go with it")
        parts = args.parts.split(",") if args.parts else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensors = vectors.run_refldm(args.candidate, dtype=args.dtype or "float32", model=args.model,
                                         parts=parts)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"{args.out}: folder {out_dir} does not exist")
        vectors.save_candidate(args.out, tensors)
        print(f"wrote refldm's {args.dtype or 'float32'} outputs for {len(tensors)} cases to {args.out}")
        return 0
    if bool(args.model) == bool(args.tiny):
        raise ValueError("give a MODEL folder or --tiny KIND (one of them)")
    kwargs = {"parts": args.parts.split(",") if args.parts else None, "dtype": args.dtype or "float64"}
    if args.size is not None:
        kwargs["size"] = args.size
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.prompts:
        kwargs["prompts"] = _read_prompts(args.prompts)
    if args.max_sequence_length is not None:
        kwargs["max_sequence_length"] = args.max_sequence_length
    kwargs["detail"] = args.detail or ("all" if args.tiny else "blocks")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"{args.out}: exists and is not a folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the suite's over-long prompt is cut on purpose
        if args.tiny:
            manifest = vectors.generate_tiny(args.tiny, args.out, **kwargs)
        else:
            if not os.path.isdir(args.model):
                raise ValueError(f"{args.model}: no such model folder")
            manifest = vectors.generate(args.model, args.out, **kwargs)
    parts = {}
    for c in manifest["cases"]:
        parts[c["part"]] = parts.get(c["part"], 0) + 1
    print(f"wrote {len(manifest['cases'])} cases ({', '.join(f'{p} {n}' for p, n in parts.items())}) to {args.out}")
    return 0


def run_verify(args) -> int:
    from refldm.crosscheck.verify import verify

    result = verify(args.bundle, args.candidate, names=args.names, mapping=args.map, precision=args.precision,
                    group=args.group)
    if args.report:
        from refldm.files import atomic_write
        page = result.html().encode("utf-8")
        atomic_write(args.report, lambda f: f.write(page))
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(f"bundle {args.bundle} ({len(result.results)} cases); candidate {args.candidate} "
              f"({len(result.provided)} provided)")
        if not args.summary:
            print(result.table())
            print()
        print("\n".join(result.summary_lines()))
    return 0 if result.ok else 1
