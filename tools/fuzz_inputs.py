"""Mutation fuzzer for what surrounds the weight loader: LoRA files, embeddings, model and scheduler
configs, tokenizer files (the audit of docs/reliability.md; tools/fuzz_weights.py covers safetensors).

Each case starts from a valid input built on the built-in model and applies one random mutation (a value
replaced by NaN / inf / 1e300 / 0 / -1 / a huge int / a string / a list / a dict / a deep nesting, a
tensor's rank cut to 0, a key dropped or renamed, metadata of another type). Every outcome is one of:

    refused    a ValueError (refldm's error classes derive from it) whose message is one line, and every
               weight, embedding row and vocabulary entry bit for bit as before
    accepted   no error, and every weight / output finite
    BAD        anything else: another exception (a traceback), a refusal that changed something, a
               non-finite weight accepted, a multi-line message, or over the time limit (a hang)

    python tools/fuzz_inputs.py --cases 500 --seed 0        # prints the counts per kind; exit 1 on any BAD
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import refldm  # noqa: E402
from refldm.adapters import lora as lora_mod  # noqa: E402
from refldm.checkpoints.weights import save_file  # noqa: E402

VALUES = [math.nan, math.inf, -math.inf, 1e300, 0, -1, 10**12, 10**30, "x", "", [], [1, 2], {}, {"a": 1},
          True, None, 1e-300, 3e38, -64, 0.5]


def deep(n=5000):
    value = []
    for _ in range(n):
        value = [value]
    return value


def _show(value):
    try:
        return json.dumps(value, allow_nan=True)[:40]
    except RecursionError:
        return "<deeply nested list>"


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def weights_of(pipe):
    out = {}
    for name in ("unet", "text_encoder"):
        for key, module in lora_mod._layers_of(getattr(pipe, name)).items():
            out[f"{name}:{key}"] = np.array(module.weight, copy=True)
    out["vocab"] = len(pipe.tokenizer)
    out["table"] = np.array(pipe.text_encoder.embeddings.token_embedding.weight, copy=True)
    return out


def same(a, b):
    return a.keys() == b.keys() and all(
        (a[k] == b[k]) if not isinstance(a[k], np.ndarray) else
        (a[k].shape == b[k].shape and np.array_equal(a[k], b[k], equal_nan=True)) for k in a)


def all_finite(state):
    return all(np.all(np.isfinite(v)) for v in state.values() if isinstance(v, np.ndarray))


# ---------------------------------------------------------------------------------------------------
# generators: (description, callable doing the load / apply)

def lora_case(rng, pipe, folder):
    layers = list(lora_mod._layers_of(pipe.unet).items())
    chosen = [layers[i] for i in rng.choice(len(layers), size=3, replace=False)]
    state = {}
    for key, module in chosen:
        w = np.asarray(module.weight)
        name = "lora_unet_" + key.replace(".", "_")
        r = 2
        if w.ndim == 4:
            state[f"{name}.lora_down.weight"] = rng.standard_normal((r,) + w.shape[1:]).astype(np.float32) * 0.1
            state[f"{name}.lora_up.weight"] = rng.standard_normal((w.shape[0], r, 1, 1)).astype(np.float32) * 0.1
        else:
            state[f"{name}.lora_down.weight"] = rng.standard_normal((r, w.shape[1])).astype(np.float32) * 0.1
            state[f"{name}.lora_up.weight"] = rng.standard_normal((w.shape[0], r)).astype(np.float32) * 0.1
        state[f"{name}.alpha"] = np.asarray(1.0, np.float32)
    metadata, scale, merge = None, float(rng.choice([1.0, 0.5, -1.0])), bool(rng.integers(2))
    kind = rng.integers(6)
    key = sorted(state)[rng.integers(len(state))]
    if kind == 0:      # a value in one tensor
        arr = state[key].copy().reshape(-1)
        arr[rng.integers(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e30])
        state[key] = arr.reshape(state[key].shape)
        what = f"value in {key}"
    elif kind == 1:    # rank 0
        stem = key.rsplit(".", 2)[0]
        down, up = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
        state[down], state[up] = state[down][:0], state[up][:, :0]
        what = f"rank 0 at {stem}"
    elif kind == 2:    # alpha
        alpha = [k for k in state if k.endswith(".alpha")][rng.integers(3)]
        state[alpha] = np.asarray(rng.choice([np.nan, np.inf, 1e300, -1e300, 0.0]), np.float64)
        what = f"alpha {float(state[alpha])}"
    elif kind == 3:    # scale
        scale = VALUES[rng.integers(len(VALUES))]
        what = f"scale {scale!r}"
    elif kind == 4:    # a key dropped
        del state[key]
        what = f"dropped {key}"
    else:              # diffusers-format metadata of some type
        state = {k.replace("lora_unet_", "unet.").replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
                 for k, v in state.items() if not k.endswith(".alpha")}
        state = {k.replace("unet.", "unet.", 1): v for k, v in state.items()}
        # kohya names use _ for .: rebuild diffusers names from the chosen keys
        state = {}
        for key2, module in chosen:
            w = np.asarray(module.weight)
            if w.ndim == 2:
                state[f"unet.{key2}.lora_A.weight"] = rng.standard_normal((2, w.shape[1])).astype(np.float32)
                state[f"unet.{key2}.lora_B.weight"] = rng.standard_normal((w.shape[0], 2)).astype(np.float32)
        if not state:
            return "no linear layer drawn", None
        field = rng.choice(["lora_alpha", "alpha_pattern", "use_rslora", "use_dora", "r"])
        value = VALUES[rng.integers(len(VALUES))]
        if field == "alpha_pattern" and rng.integers(2):
            value = {rng.choice(["to_(q", "attn1", "[", "(?P<x", "ff"]): VALUES[rng.integers(len(VALUES))]}
        meta = {f"unet.{field}": value} if rng.integers(4) else VALUES[rng.integers(len(VALUES))]
        metadata = {"lora_adapter_metadata": json.dumps(meta, allow_nan=True)}
        what = f"metadata {metadata['lora_adapter_metadata'][:60]}"
    path = Path(folder) / "case.safetensors"
    save_file(state, path, metadata=metadata)
    return what, lambda: lora_mod.apply_loras(pipe, [(path, scale)], merge=merge)


def embedding_case(rng, pipe, folder):
    from refldm.adapters.textual_inversion import load_textual_inversion
    token = str(rng.choice(["<new>", "", " ", "a b", "<x>", "cat</w>", "\n"]))
    vectors = rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        vectors.reshape(-1)[rng.integers(vectors.size)] = rng.choice([np.nan, np.inf, 3e38, 1e20, 65505.0])
    elif kind == 1:
        vectors = vectors[:, : int(rng.integers(0, 80))]
    elif kind == 2:
        vectors = vectors.reshape(-1)[: int(rng.integers(0, 5))]
    path = Path(folder) / "emb.safetensors"
    save_file({token if token else "": vectors} if rng.integers(2) else {"emb_params": vectors}, path)
    return f"token {token!r} shape {vectors.shape} kind {kind}", lambda: load_textual_inversion(pipe, path)


def config_case(rng, pipe, folder):
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    from refldm.schedulers import DDIMScheduler, EulerDiscreteScheduler
    part = str(rng.choice(["vae", "unet", "text_encoder", "scheduler"]))
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    config = json.load(open(os.path.join(refldm.DEFAULT_MODEL, part, name)))
    key = sorted(config)[rng.integers(len(config))] if rng.integers(4) else f"unknown_{rng.integers(9)}"
    value = deep() if rng.integers(20) == 0 else VALUES[rng.integers(len(VALUES))]
    config[key] = value
    cls = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}.get(part)

    def run():
        if cls is None:
            sched = (DDIMScheduler if rng.integers(2) else EulerDiscreteScheduler).from_config(config)
            sched.set_timesteps(4)
            return
        parsed = cls.parse_config(config, f"{part}/config.json")
        cls(parsed)  # building the module tree from the config (no weights)
    return f"{part}.{key} = {_show(value)}", run


def tokenizer_case(rng, pipe, folder):
    import shutil
    from refldm.models.tokenizer import CLIPTokenizer
    target = Path(folder) / "tok"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(os.path.join(refldm.DEFAULT_MODEL, "tokenizer"), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    key = str(rng.choice(["model_max_length", "added_tokens_decoder", "bos_token", "pad_token", "unk_token"]))
    value = deep() if rng.integers(20) == 0 else VALUES[rng.integers(len(VALUES))]
    config[key] = value
    try:
        (target / "tokenizer_config.json").write_text(json.dumps(config, allow_nan=True))
    except RecursionError:
        (target / "tokenizer_config.json").write_text('{"model_max_length": ' + "[" * 5000 + "]" * 5000 + "}")

    def run():
        tok = CLIPTokenizer.from_pretrained(target)
        tok("a red circle on a white background")
    return f"tokenizer_config {key} = {_show(value)}", run


KINDS = {"lora": lora_case, "embedding": embedding_case, "config": config_case, "tokenizer": tokenizer_case}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="cases per kind (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--timeout", type=int, default=20, help="seconds per case before it counts as a hang")
    args = parser.parse_args(argv)
    from refldm import StableDiffusionPipeline
    signal.signal(signal.SIGALRM, _alarm)
    bad_total = 0
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            rng = np.random.default_rng([args.seed, list(KINDS).index(kind)])
            counts = {"refused": 0, "accepted": 0, "traceback": 0, "changed on refusal": 0,
                      "non-finite accepted": 0, "multi-line message": 0, "hang": 0}
            started = time.perf_counter()
            for i in range(args.cases):
                pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL) if i % 50 == 0 else pipe
                what, run = KINDS[kind](rng, pipe, folder)
                if run is None:
                    continue
                before = weights_of(pipe)
                signal.alarm(args.timeout)
                try:
                    run()
                except Hang:
                    counts["hang"] += 1
                    print(f"  HANG {kind}: {what}")
                except ValueError as e:
                    signal.alarm(0)
                    counts["refused"] += 1
                    if "\n" in str(e).strip():
                        counts["multi-line message"] += 1
                        print(f"  MULTI-LINE {kind}: {what}: {e!r}")
                    if not same(before, weights_of(pipe)):
                        counts["changed on refusal"] += 1
                        print(f"  CHANGED {kind}: {what}: {e}")
                        pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
                except Exception as e:  # noqa: BLE001 - that is what a fuzzer counts
                    counts["traceback"] += 1
                    print(f"  TRACEBACK {kind}: {what}: {type(e).__name__}: {str(e)[:120]}")
                    if os.environ.get("FUZZ_VERBOSE"):
                        traceback.print_exc()
                else:
                    counts["accepted"] += 1
                    after = weights_of(pipe)
                    if not all_finite(after):
                        counts["non-finite accepted"] += 1
                        print(f"  NON-FINITE {kind}: {what}")
                    if kind == "lora":
                        lora_mod.remove_loras(pipe)
                    elif kind == "embedding":
                        pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
                finally:
                    signal.alarm(0)
            bad = sum(v for k, v in counts.items() if k not in ("refused", "accepted"))
            bad_total += bad
            print(f"{kind:10s} {args.cases} cases in {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
