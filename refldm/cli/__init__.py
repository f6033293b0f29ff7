"""The ``refldm`` command line: one subcommand module per topic, each with ``register(subparsers)``.

Each module's ``register`` adds its subcommands and sets ``func`` on them; ``main`` parses and runs.
User errors (a missing file, a bad shape, an unsupported config) print one line, ``refldm: error: ...``,
and exit with status 2; they never print a traceback.

May import: any layer. Holds no math: argument parsing, checks of the arguments, printing.

Every subcommand, whichever module registers it, also takes ``--reference``: run the pure reference
ops only (refldm/core/ops.py, without the host speed layer), the same as ``REFLDM_ACCEL=0``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# the subcommand modules, in the order their commands appear in --help
_MODULES = ("refldm.cli.generate", "refldm.cli.vae", "refldm.cli.trace", "refldm.cli.analysis",
            "refldm.cli.samplers")
_MODULES += ("refldm.cli.inpaint",)  # inpainting (refldm/cli/inpaint.py)
_MODULES += ("refldm.cli.pnginfo",)  # png-info: settings read back from an image (refldm/cli/pnginfo.py)
_MODULES += ("refldm.cli.control",)  # control: control images for ControlNets (refldm/cli/control.py)
_MODULES += ("refldm.cli.vectors",)  # conformance vectors and verify (refldm/cli/vectors.py)
_MODULES += ("refldm.cli.explain",)  # explain: one HTML page of a generation (refldm/cli/explain.py)
_MODULES += ("refldm.cli.grid",)  # grid: X/Y/Z grids, here, in local processes or on Dask (refldm/cli/grid.py)


# Commands that print facts or compare files: no op runs, so --reference would mean nothing there.
COMPUTE_NOTHING = {"sizes", "samplers", "compare", "info", "png-info", "verify"}


def accel_switch(on: bool):
    """``refldm.accel.enabled(on)`` for the grid's cells and bundles (refldm/grid/ never imports the speed layer;
    `main` hands it to the subcommands as args.accel_switch): module-level, so it travels to worker processes by name."""
    from refldm.accel import enabled
    return enabled(on)


def accel_on() -> bool:
    """Whether the speed layer is on in this process (--reference / REFLDM_ACCEL=0: off)."""
    from refldm.accel import is_enabled
    return is_enabled()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refldm", description="A NumPy reference implementation of "
                                     "latent diffusion (Stable Diffusion).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        importlib.import_module(name).register(sub)  # a broken subcommand fails loudly, never hides
    for name, command in sub.choices.items():  # added here, so every computing command gets it
        if name in COMPUTE_NOTHING or any("--reference" in action.option_strings for action in command._actions):
            continue  # a command with its own --reference keeps it (REFLDM_ACCEL=0 still works there)
        command.add_argument("--reference", action="store_true", dest="reference_ops",
                             help="run the pure reference ops only, without the host speed layer "
                                  "(as REFLDM_ACCEL=0; slower, same results within float rounding)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.accel_switch, args.accel_on = accel_switch, accel_on  # the speed layer's switch, for the grid's workers
    from refldm.accel.threads import process_environment
    args.worker_env = process_environment  # the grid's worker processes: the CPUs shared out (threads, BLAS)
    try:
        if getattr(args, "reference_ops", False):
            from refldm.accel import enabled as accelerated
            with accelerated(False):
                result = args.func(args)
        else:
            result = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `refldm info | head -2`: the reader left; say nothing, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        message = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        print(f"refldm: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refldm: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
