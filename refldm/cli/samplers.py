"""``refldm samplers``: the sampler names refldm accepts, as the web UIs and libraries spell them."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "samplers", help="list the sampler names (A1111, ComfyUI, diffusers, k-diffusion)",
        description="Every name --sampler accepts: AUTOMATIC1111's label, ComfyUI's sampler (+ scheduler), "
                    "refldm's short name, the diffusers class and config it means, and k-diffusion's function.")
    p.add_argument("--missing", action="store_true", help="also list the web UIs' samplers refldm lacks")
    p.set_defaults(func=run_samplers)


# k-diffusion's samplers that diffusers has no class for: refldm's own classes (refldm/schedulers/ksampler.py,
# dpm_fast.py, dpm_adaptive.py, dpmpp_*.py), marked "*" so nobody looks for them in diffusers.
REFLDM_ONLY = {"DPMPP2SAncestralScheduler", "DPMPP3MSDEScheduler", "DPMFastScheduler", "DPMAdaptiveScheduler"}


def _keys(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items()) or "the model's own"


def run_samplers(args) -> int:
    from refldm.schedulers import names

    header = ("A1111", "ComfyUI", "refldm --sampler", "class (config); * refldm's own", "k-diffusion")
    rows = [header] + [row[:3] + (("* " if row[3].split("(")[0] in REFLDM_ONLY else "") + row[3],) + row[4:]
                       for row in names.table()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print("\nschedules (a suffix, or ComfyUI's scheduler): "
          + ", ".join(f"{k} ({_keys(v)})" for k, v in names.SCHEDULES.items()))
    if args.missing:
        print("\nnot implemented in refldm:")
        for label, (comfy, equivalent) in names.MISSING.items():
            print(f"  {label} ({comfy}): {equivalent}")
    return 0
