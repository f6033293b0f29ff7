"""Traces: recording every layer of a model or a pipeline run, and trace files. The cross-checking toolkit.

A *trace* is every module output of one forward pass, in execution order, each under the checkpoint
key prefix of the module that produced it::

    with refldm.crosscheck.trace.record() as t:
        unet(sample, timestep, encoder_hidden_states)
    t.activations   # {"conv_in": ..., "time_embedding.linear_1": ..., ..., "conv_out": ..., "<root>": ...}

Names follow the checkpoint keys, hence diffusers' ``named_modules()``:
``down_blocks.1.attentions.0.transformer_blocks.0.attn1`` is the output of the module whose weights are
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.*``. A module called several times in one
recording (a UNet called once per sampler step) gets ``name``, ``name#2``, ``name#3``, ... in call
order. The model's own output is recorded under ``<root>`` (its key prefix is empty).

The recording itself is `refldm.core.record`, a hook with no dependencies that the library calls:
`refldm.core.nn.Module.__call__` hands it every module output, `refldm.pipelines.sampling.sample` each step's values,
the pipeline names its parts with ``record.scope``. This module sits above the library: it starts a
recording, runs a model or the pipeline unchanged (nothing is patched or wrapped), and reads and
writes trace files. Outputs are recorded after ``forward`` returns, so the order is post-order:
children before parents, exactly the order in which PyTorch forward hooks fire. That is what lets a
trace from diffusers (``tools/trace_diffusers.py``) be compared name by name with one from refldm
(`refldm.crosscheck.compare`).

`trace_part` runs one part of a model folder (what ``refldm trace --part unet`` does);
`trace_pipeline` runs the whole text-to-image pipeline and records, at every sampler step, the
latents, the U-Net's noise prediction, the guided prediction and the scheduler's outputs.

A trace file is a plain safetensors file, readable by any safetensors library without refldm::

    tensors   {activation name: array}  plus {"input/<name>": array} for the inputs of the pass
    metadata  "format": "refldm-trace/1", "order": JSON list of activation names in execution order,
              "inputs": JSON list of input names, "dtype", "part", "config" (the model's config.json
              as JSON), "producer" (what wrote it), and free-form extras.
"""

from __future__ import annotations

import json
import os

import numpy as np

from refldm import backend
from refldm.about import __version__
from refldm.core import record as _record
from refldm.core.record import ROOT, Recorder, base_name, main_array, scope
from refldm.checkpoints.weights import load_file, read_config, read_header, save_file

__all__ = ["record", "Recorder", "scope", "note", "main_array", "base_name", "ROOT", "Trace", "save", "load",
           "save_trace", "PARTS", "part_inputs", "part_folder", "make_inputs", "load_part", "run_part", "trace_part",
           "PIPELINE_INCLUDE", "trace_pipeline"]

FORMAT = "refldm-trace/1"
INPUT_PREFIX = "input/"


def record(include=None) -> Recorder:
    """Start recording activations: ``with record() as t: model(x)``; then ``t.activations``."""
    return Recorder(include)


note = _record.value  # record a value that is not a module output (the older name of `refldm.core.record.value`)


def __getattr__(name: str):
    if name == "recorder":  # the active Recorder lives in refldm.core.record; read it there, live
        return _record.recorder
    raise AttributeError(f"module 'refldm.crosscheck.trace' has no attribute {name!r}")


class Trace:
    """A trace read back from a file: activations in execution order, inputs, and metadata."""

    def __init__(self, activations: dict, inputs: dict | None = None, metadata: dict | None = None,
                 path: str | None = None):
        self.activations = dict(activations)
        self.inputs = dict(inputs or {})
        self.metadata = dict(metadata or {})
        self.path = path

    @property
    def names(self) -> list:
        return list(self.activations)

    def config(self) -> dict:
        """The model config stored with the trace ({} if none)."""
        return json.loads(self.metadata.get("config") or "{}")

    def __len__(self):
        return len(self.activations)

    def __repr__(self):
        where = f" from {self.path}" if self.path else ""
        return f"Trace({len(self.activations)} activations, inputs {sorted(self.inputs)}{where})"


def save(path, activations, inputs=None, **metadata) -> None:
    """Write a trace file (see the module docstring for the layout).

    `activations`: {name: array} in execution order (a `Recorder` or `Trace` is accepted too);
    `inputs`: {input name: array}; `metadata`: str values, or values stored as JSON (``config=dict``).
    """
    if isinstance(activations, (Recorder, Trace)):
        activations = activations.activations
    inputs = dict(inputs or {})
    for name in activations:
        if name.startswith(INPUT_PREFIX):
            raise ValueError(f"{path}: activation name {name!r} clashes with the {INPUT_PREFIX!r} prefix of inputs")
    tensors = dict(activations)
    tensors.update({INPUT_PREFIX + k: v for k, v in inputs.items()})
    meta = {"format": FORMAT, "order": json.dumps(list(activations)), "inputs": json.dumps(list(inputs))}
    for key, value in metadata.items():
        if value is not None:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors, path, meta)


def load(path) -> Trace:
    """Read a trace file; a plain safetensors file without trace metadata loads with sorted names."""
    _, metadata, _ = read_header(path)
    tensors = load_file(path)
    try:
        order = json.loads(metadata.get("order", "null"))
        input_names = json.loads(metadata.get("inputs", "[]"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: trace metadata 'order' or 'inputs' is not valid JSON ({e})") from None
    for name, value in (("order", order), ("inputs", input_names)):
        if not (value is None and name == "order") and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: trace metadata {name!r} must be a JSON list of tensor names, not "
                             f"{type(value).__name__}")
    inputs = {k: tensors.pop(INPUT_PREFIX + k) for k in input_names if INPUT_PREFIX + k in tensors}
    for key in [k for k in tensors if k.startswith(INPUT_PREFIX)]:
        inputs[key[len(INPUT_PREFIX):]] = tensors.pop(key)
    if order is None:
        order = sorted(tensors)
    missing = [k for k in order if k not in tensors]
    if missing:
        raise ValueError(f"{path}: trace lists activation {missing[0]!r} in its order but holds no such tensor")
    activations = {k: tensors[k] for k in order}
    activations.update({k: v for k, v in tensors.items() if k not in activations})
    return Trace(activations, inputs, metadata, path=str(path))


# ---------------------------------------------------------------------------------------------------
# Tracing one part of a model folder on generated or given inputs (what ``refldm trace`` runs)

# part -> (subfolder of a pipeline folder, names of the inputs, in call order)
PARTS = {
    "unet": ("unet", ("sample", "timestep", "encoder_hidden_states")),
    "vae-encode": ("vae", ("images",)),
    "vae-decode": ("vae", ("latents",)),
    "text-encoder": ("text_encoder", ("input_ids",)),
    "text-encoder-2": ("text_encoder_2", ("input_ids",)),  # SDXL's second encoder (with projection)
    # SD3's MMDiT (SD3Transformer2DModel), in its forward's order
    "transformer": ("transformer", ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
}
# SDXL U-Nets (addition_embed_type "text_time") also take the pooled text embedding and the time ids
SDXL_UNET_INPUTS = ("text_embeds", "time_ids")


def part_inputs(part: str, config: dict) -> tuple:
    """The input names `part` needs with this config, in call order."""
    names = PARTS[part][1]
    if part == "unet" and config.get("addition_embed_type") == "text_time":
        names = names + SDXL_UNET_INPUTS
    return names


def part_folder(folder, part: str) -> str:
    """The model folder of `part`: `folder` itself, or its ``unet/``, ``vae/``, ``text_encoder/`` subfolder."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    folder = os.fspath(folder)
    sub = os.path.join(folder, PARTS[part][0])
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such model folder")
    return folder


def make_inputs(part: str, config: dict, batch: int = 1, height: int | None = None, width: int | None = None,
                seq_len: int | None = None, timestep: float = 500.0, seed: int = 0) -> dict:
    """Random inputs for `part`, as float64 (input_ids int64) NumPy arrays, from NumPy's PCG64 at `seed`.

    height, width: of the part's own input (latent size for unet and vae-decode, image size for
    vae-encode); default: the config's sample_size (divided by the VAE's downscale factor for vae-decode).
    The UNet gets sample ~ N(0, 1), encoder_hidden_states ~ N(0, 1) of seq_len (77) tokens and a
    constant timestep; an SDXL U-Net also text_embeds ~ N(0, 1) and six time ids (original size, crop,
    target size in pixels: the U-Net only sees their embeddings concatenated to text_embeds, so the split
    of projection_class_embeddings_input_dim between the two is free); the VAE encoder images
    ~ U(-1, 1); the text encoders' token ids ~ U{0, vocab - 1}.
    """
    rng = np.random.default_rng(seed)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")

    def size(default):
        if isinstance(default, (list, tuple)):
            default = default[0]
        h, w = height or default, width or default
        if h < 1 or w < 1:
            raise ValueError(f"height and width must be positive, got {h}x{w}")
        return h, w

    if part == "unet":
        h, w = size(config.get("sample_size") or 64)
        ctx = config.get("cross_attention_dim") or 768
        ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
        inputs = {"sample": rng.standard_normal((batch, config.get("in_channels", 4), h, w)),
                  "timestep": np.full((batch,), float(timestep)),
                  "encoder_hidden_states": rng.standard_normal((batch, seq_len or 77, ctx))}
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text (B, P - 6 d) and 6 ids
            n_ids, d = 6, config["addition_time_embed_dim"]
            pooled = config["projection_class_embeddings_input_dim"] - n_ids * d
            if pooled < 1:
                raise ValueError(f"projection_class_embeddings_input_dim "
                                 f"{config['projection_class_embeddings_input_dim']} leaves no room for "
                                 f"text_embeds beside {n_ids} time ids of {d}")
            inputs["text_embeds"] = rng.standard_normal((batch, pooled))
            inputs["time_ids"] = np.tile(np.array([8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]), (batch, 1))
        return inputs
    if part == "transformer":  # SD3: latent ~ N(0, 1), text tokens of seq_len (77 + 256), pooled text, t
        h, w = size(config.get("sample_size") or 128)
        return {"hidden_states": rng.standard_normal((batch, config.get("in_channels", 16), h, w)),
                "encoder_hidden_states": rng.standard_normal((batch, seq_len or 333,
                                                              config.get("joint_attention_dim", 4096))),
                "pooled_projections": rng.standard_normal((batch, config.get("pooled_projection_dim", 2048))),
                "timestep": np.full((batch,), float(timestep))}
    if part == "vae-encode":
        h, w = size(config.get("sample_size") or 256)
        return {"images": rng.uniform(-1.0, 1.0, (batch, config.get("in_channels", 3), h, w))}
    if part == "vae-decode":
        f = 2 ** (len(config.get("block_out_channels", [64])) - 1)
        sample = config.get("sample_size") or 256
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        h, w = size(max(1, sample // f))
        return {"latents": rng.standard_normal((batch, config.get("latent_channels", 4), h, w))}
    if part in ("text-encoder", "text-encoder-2"):
        length = seq_len or config.get("max_position_embeddings", 77)
        return {"input_ids": rng.integers(0, config.get("vocab_size", 49408), (batch, length), dtype=np.int64)}
    raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def load_part(folder, part: str, dtype="float32"):
    """Load the refldm model that runs `part` from a model or pipeline folder."""
    folder = part_folder(folder, part)
    if part == "unet":
        from refldm.models.unet import UNet2DConditionModel as cls
    elif part == "transformer":
        from refldm.models.sd3_transformer import SD3Transformer2DModel as cls
    elif part.startswith("vae"):
        from refldm.models.vae import AutoencoderKL as cls
    elif part == "text-encoder-2":
        from refldm.models.clip import CLIPTextModelWithProjection as cls
    else:
        from refldm.models.clip import CLIPTextModel as cls
    return cls.from_pretrained(folder, dtype=dtype)


def run_part(model, part: str, inputs: dict, dtype="float32"):
    """Run `part` of a refldm model on NumPy inputs (float arrays cast to `dtype`, put on the backend)."""

    def arr(name, dt=dtype):
        return backend.asarray(inputs[name], dtype=dt)

    if part == "unet":
        added = {k: arr(k, "float64" if k == "time_ids" else dtype) for k in SDXL_UNET_INPUTS if k in inputs}
        return model(arr("sample"), arr("timestep", "float64"), arr("encoder_hidden_states"),
                     added_cond_kwargs=added or None)
    if part == "transformer":
        return model(arr("hidden_states"), arr("encoder_hidden_states"), arr("pooled_projections"),
                     arr("timestep", "float64"))
    if part == "vae-encode":
        return model.encode(arr("images"))
    if part == "vae-decode":
        return model.decode(arr("latents"))
    if part in ("text-encoder", "text-encoder-2"):
        return model(backend.asarray(inputs["input_ids"]))
    raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")


def trace_part(folder, part: str, dtype="float32", inputs: dict | None = None, include=None, model=None,
               seed: int = 0, **shape) -> Trace:
    """Trace one part of a model folder; returns a `Trace` ready for `save` or `refldm.crosscheck.compare.compare`.

    inputs: {name: array} to use (e.g. another trace's ``.inputs``), else random ones from `make_inputs`
    (seed, shape: batch, height, width, seq_len, timestep). model: an already loaded refldm model.
    """
    config = read_config(part_folder(folder, part))
    dt = backend.resolve_dtype(dtype)
    if inputs is None:
        inputs = make_inputs(part, config, seed=seed, **shape)
    else:
        wanted = part_inputs(part, config)
        missing = [k for k in wanted if k not in inputs]
        if missing:
            raise ValueError(f"the given inputs lack {missing[0]!r}, which part {part!r} needs "
                             f"(it needs {', '.join(wanted)})")
        inputs = {k: backend.to_numpy(inputs[k]) for k in wanted}
    # store the inputs as the model sees them: float inputs in the model dtype (timestep in float64)
    stored = {k: (np.asarray(v, dtype=dt) if v.dtype.kind == "f" and k not in ("timestep", "time_ids")
                  else np.asarray(v))
              for k, v in inputs.items()}
    if model is None:
        model = load_part(folder, part, dtype)
    with record(include) as rec:
        run_part(model, part, stored, dt)
    if not rec.activations:
        raise RuntimeError(f"tracing {part} recorded nothing (is --include too narrow?)")
    meta = {"format": FORMAT, "order": json.dumps(list(rec.activations)), "inputs": json.dumps(list(stored)),
            "part": part, "dtype": dt.name, "config": json.dumps(config), "seed": str(seed),
            "producer": f"refldm {__version__}", "backend": backend.name()}
    return Trace(rec.activations, stored, meta)


def save_trace(path, t: Trace) -> None:
    """Write a `Trace` (with its inputs and metadata) to a trace file."""
    extra = {k: v for k, v in t.metadata.items() if k not in ("format", "order", "inputs")}
    save(path, t.activations, t.inputs, **extra)


# ---------------------------------------------------------------------------------------------------
# Tracing the whole pipeline, step by step

# What a pipeline trace keeps unless told otherwise: the text embeddings, every sampler step's
# inputs and outputs, and the decoded image. Add "steps.*.unet.*" for every U-Net layer at every step.
PIPELINE_INCLUDE = ("text_encoder", "steps.*.timestep", "steps.*.latents", "steps.*.model_input",
                    "steps.*.noise_pred", "steps.*.guided", "steps.*.prev_sample",
                    "steps.*.pred_original_sample", "vae.decoder")


def trace_pipeline(folder=None, prompt: str = "", negative_prompt=None, steps: int = 4,
                   guidance_scale: float = 7.5, seed: int = 0, height=None, width=None, dtype="float32",
                   scheduler=None, include=None, pipe=None) -> Trace:
    """Run the whole text-to-image pipeline with tracing on; returns a `Trace`.

    Names: ``text_encoder.<layer>`` (``#2`` for the negative prompt's pass); for each sampler step i
    ``steps.<i>.timestep``, ``.model_input`` (what the U-Net receives: x_t after the scheduler's input
    scaling, doubled into the CFG batch), ``.unet.<layer>``, ``.noise_pred`` (the U-Net output),
    ``.latents`` (x_t going into the scheduler step), ``.guided`` (after classifier-free guidance: what
    the scheduler receives), ``.prev_sample`` (x_{t-1}), ``.pred_original_sample``; then
    ``vae.<layer>`` of the decode.
    `include`: glob patterns of names to keep (default `PIPELINE_INCLUDE`; "*" keeps all).
    A wrong U-Net shows first in ``noise_pred``; a wrong scheduler in ``prev_sample`` with a right ``guided``.
    """
    if pipe is None:
        from refldm.pipelines.sd import StableDiffusionPipeline
        from refldm.pipelines.sd3 import StableDiffusion3Pipeline, is_sd3_folder

        cls = StableDiffusion3Pipeline if folder is not None and is_sd3_folder(folder) else StableDiffusionPipeline
        pipe = cls.from_pretrained(folder, dtype=dtype)
    sd3 = getattr(pipe, "transformer", None) is not None
    denoiser = pipe.transformer if sd3 else pipe.unet  # SD3: the MMDiT (its layers under steps.*.unet.*)
    from refldm.core.random import Generator

    # The starting noise x_T is drawn in float32 whatever the compute dtype, so that a float32 run and
    # its float64 golden start from the same numbers (a float64 draw of torch's stream differs). The
    # same generator then goes on to the sampler (ancestral samplers draw their step noise from it).
    height = int(height or pipe.default_size)
    width = int(width or pipe.default_size)
    f = pipe.vae_scale_factor
    if height % f or width % f or height < f or width < f:
        raise ValueError(f"height and width must be positive multiples of {f}, got {width}x{height}")
    generator = Generator(seed)
    noise = generator.randn((1, denoiser.config.in_channels, height // f, width // f), dtype="float32")
    # the pipeline and the sampler name what they record themselves (refldm.core.record): nothing is patched
    with record(PIPELINE_INCLUDE if include is None else include) as rec:
        pipe(prompt, negative_prompt=negative_prompt, height=height, width=width,
             num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
             latents=noise, **({"sampler": scheduler} if sd3 else {"scheduler": scheduler}),
             progress=False)
    configs = getattr(pipe, "configs", {}) or {}
    meta = {"part": "pipeline", "dtype": backend.resolve_dtype(getattr(pipe, "dtype", dtype)).name,
            "config": json.dumps(configs), "seed": str(seed), "prompt": prompt,
            "negative_prompt": negative_prompt or "", "steps": str(steps), "guidance_scale": repr(guidance_scale),
            "scheduler": scheduler or str(getattr(pipe, "scheduler_config", {}).get("_class_name")),
            "producer": f"refldm {__version__}", "backend": backend.name(),
            "height": str(height), "width": str(width),
            "order": json.dumps(list(rec.activations)), "inputs": '["noise"]', "format": FORMAT}
    return Trace(rec.activations, {"noise": noise}, meta)
