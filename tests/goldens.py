"""Stored golden fixtures: float64 outputs of tiny diffusers / transformers models, read without torch.

tools/make_goldens.py (which needs the crosscheck extra) builds tiny random-weight configs with
diffusers and transformers, fills every weight with `weight(name, shape, seed)` below, runs them in
float64 and writes tests/data/goldens/<part>.npz: the config (JSON text), the weight names and shapes
(JSON text), the seed, the inputs and the outputs. The weights themselves are not stored: this module
recreates them, bit for bit, from their names and the seed, so each file stays a few KB.

The .npz files hold plain arrays and strings only and are read with ``allow_pickle=False``.
tests/test_goldens.py loads each part in refldm from a folder written here and compares.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zlib

import numpy as np

GOLDENS = pathlib.Path(__file__).resolve().parent / "data" / "goldens"


def weight(name: str, shape, seed: int) -> np.ndarray:
    """A float64 weight that depends only on (name, shape, seed): matrices ~ N(0, 1/fan_in), norm scales
    near 1, everything else (biases, norm shifts, embeddings rows' scale aside) ~ N(0, 0.1^2)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 2:
        return rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)


def state(shapes: dict, seed: int) -> dict:
    """{name: weight(name, shape, seed)} for every entry of `shapes` ({name: shape})."""
    return {name: weight(name, shape, seed) for name, shape in shapes.items()}


def save(part: str, config: dict, shapes: dict, seed: int, arrays: dict, folder=GOLDENS) -> pathlib.Path:
    """Write tests/data/goldens/<part>.npz (config and shapes as JSON text; arrays as given)."""
    os.makedirs(folder, exist_ok=True)
    path = pathlib.Path(folder) / f"{part}.npz"
    np.savez_compressed(path, config=np.array(json.dumps(config, sort_keys=True)),
                        shapes=np.array(json.dumps(shapes, sort_keys=True)), seed=np.array(seed), **arrays)
    return path


def load(part: str, folder=GOLDENS) -> dict:
    """The stored fixture of `part`: {"config": dict, "shapes": dict, "seed": int, <array name>: array}."""
    with np.load(pathlib.Path(folder) / f"{part}.npz", allow_pickle=False) as data:
        out = {name: data[name] for name in data.files}
    out["config"] = json.loads(str(out["config"]))
    out["shapes"] = json.loads(str(out["shapes"]))
    out["seed"] = int(out["seed"])
    return out


def write_folder(golden: dict, folder, weights_file: str) -> str:
    """A model folder refldm loads: config.json and the recreated weights in `weights_file` (safetensors)."""
    from refldm.checkpoints.weights import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(golden["config"], f)
    save_file(state(golden["shapes"], golden["seed"]), os.path.join(folder, weights_file))
    return os.fspath(folder)
