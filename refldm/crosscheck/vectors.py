"""Conformance vectors: golden inputs and outputs of every part of a checkpoint, readable from any language.

A *bundle* is a folder::

    manifest.json           what every case is (below), tolerances, provenance
    <part>.safetensors      the tensors of one part: tokenizer, text_encoder, vae, unet, scheduler, noise, pipeline
    model/                  (tiny bundles) the model's weights: a diffusers folder, and model/original.safetensors
                            with the same weights under the original (LDM / single-file) key names

A *group* is one forward pass (one prompt through the tokenizer, one U-Net call at one timestep, one run
of a sampler, ...); its inputs are stored once, under ``<group>/input/<name>``. A *case* is one output of a
group: a layer's output, named ``<group>/<layer>`` with the layer named as diffusers' ``named_modules()``
(``unet.t999.cond/down_blocks.0.resnets.0``); the same string names its tensor in the bundle and the tensor a
port writes in its candidate file (`refldm.crosscheck.verify`). Groups and cases are listed in data-flow
order: tokenizer, text encoder(s), VAE encoder and decoder, U-Net, schedulers, noise, the whole pipeline.
A group's inputs come from the golden outputs of the groups before it (the U-Net's text embeddings are the
text encoder's golden output), so a port can check each part on its own, in any order.

Each case in the manifest holds: ``name``, ``group``, ``part``, ``layer``, ``module`` (the diffusers /
transformers module path), ``original`` (the original checkpoint's key prefix, where one module maps to one),
``inputs`` (the tensor names of the group's inputs, in call order), ``output``, ``shape``, ``dtype``,
``tolerance`` ({"float32": .., "float16": .., "float64": ..}: the largest relative error a port computing in that dtype may
make, rel = max|a - b| / max|b|; docs/porting.md justifies each), ``description``, ``docs`` and
``provenance`` (refldm version, the model config's SHA-256, the seed).

    refldm vectors MODEL --out DIR                 # a bundle of a model folder (float64 goldens)
    refldm vectors --tiny sd15 --out DIR           # a tiny random-weight model, weights included

    from refldm.crosscheck import vectors
    bundle = vectors.load("DIR")
    for case in bundle.cases_of("text_encoder.p00"):
        case.check(my_outputs[case.layer])          # raises VectorMismatch naming the case, or returns a result

The goldens are computed by refldm in float64 (``--dtype float32`` for a float32 reference). Nothing in a
bundle depends on the clock, the machine's paths or the thread count, so the same command writes the same
bytes (measured by the tests; across machines see docs/porting.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys

import numpy as np

from refldm import backend
from refldm.about import __version__
from refldm.checkpoints.weights import load_file, read_config, read_header, save_file
from refldm.core.record import Recorder
from refldm.crosscheck import vectors_flow

__all__ = ["FORMAT", "PARTS", "TOLERANCES", "PROMPTS", "SAMPLERS", "PIPELINE_SAMPLERS", "generate", "generate_tiny",
           "load", "Bundle", "Case", "score", "CaseResult", "VectorMismatch", "BundleError", "run_refldm", "save_candidate", "Models"]

FORMAT = "refldm-vectors/1"
PARTS = ("tokenizer", "text_encoder", "vae", "unet", "transformer", "scheduler", "noise", "pipeline")  # data-flow order
DOCS = "docs/"  # links are relative to the refldm repository

# Relative-error tolerances (rel = max|a - b| / max|b|) for a port computing in float32 and in float16,
# by kind of case. docs/porting.md, "What the tolerances mean", derives each.
TOLERANCES = {  # kind of case: (float32, float16, float64)
    "tokens": (0.0, 0.0, 0.0),                    # token ids and masks: integers, exact
    "prompt_weights": (1e-6, 1e-3, 1e-12),        # products of 1.1: a few roundings
    "text_encoder": (1e-4, 2e-2, 1e-10),
    "vae": (1e-4, 2e-2, 1e-10),
    "unet": (1e-4, 2e-2, 1e-10),
    "transformer": (1e-4, 2e-2, 1e-10),           # the MMDiT of SD3 / FLUX: as the U-Net
    "scheduler_table": (1e-5, 2e-3, 1e-12),       # tables of 1000 cumulative products, then interpolation
    "scheduler_step": (1e-5, 2e-3, 1e-12),        # a few fused multiply-adds per element per step
    "noise": (1e-6, 1e-3, 1e-6),                  # a seed stream: the same numbers up to libm's last bit
    "pipeline": (1e-3, 5e-2, 1e-8),               # every part above, over several steps, then the decoder
    "image_uint8": (2.0 / 255 + 1e-9, 4.0 / 255 + 1e-9, 1.0 / 255 + 1e-9),  # 8-bit pixels: levels off
}
PRECISIONS = ("float32", "float16", "float64")

DOC_PAGES = {"tokenizer": "text_encoder.md", "text_encoder": "text_encoder.md", "vae": "vae.md", "unet": "unet.md",
             "transformer": "sd3.md", "scheduler": "schedulers.md", "noise": "pipeline.md", "pipeline": "pipeline.md"}

# The prompt suite: the hard parts of CLIP's tokenizer and of the web UI's prompt syntax.
PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "",
    "Café crème, naïve façade — Ångström ÉCOLE",
    "a cat 🐱 with a 🎩 hat, 👍🏽!!",
    "wait... what?!?! (((really))) ,,, ;; -- ##",
    "3.14159 and 1,000,000 or 2024-06-24 at 12:30",
    "東京の夜 красивый город مدينة",
    "  many   spaces\tand\nnewlines  ",
    "don't you'll it's THEY'RE",
    " ".join(["a very long prompt about a red circle and a blue square"] * 12),
    "a (red:1.3) cat, [blue] dog, ((white background)) BREAK oil painting \\(literal\\)",
)
WEBUI_PROMPTS = (10,)  # indices of PROMPTS also encoded with the web UI's weighting syntax
TEXT_PROMPTS = (0, 1)  # prompts run through the text encoders: the cond prompt and the empty (uncond) one
TIMESTEPS = (999, 500, 1)
# samplers by name (`refldm samplers`), "|key=value" adds a scheduler option
SAMPLERS = ("ddim", "ddim|timestep_spacing=trailing", "pndm", "lms", "euler", "euler|timestep_spacing=linspace",
            "heun", "dpm++2m", "DPM++ 2M Karras", "unipc", "ddpm", "euler_a", "dpm++2m_sde")
STOCHASTIC = ("ddpm", "euler_a", "dpm++2m_sde")  # their step adds noise: given per call as input noise.<i>
TABLE_STEPS = (10, 25)  # step counts whose tables are stored beside --steps
PIPELINE_SAMPLERS = ("ddim", "euler", "dpm++2m")
NOISE_SEEDS = (0, 42, 2**32 + 7)
SEED = 0


class BundleError(ValueError):
    """A bundle that cannot be read: missing or corrupt manifest or tensor file, another format version."""


class VectorMismatch(AssertionError):
    """`Case.check` found an output outside the case's tolerance (one line: the case and the errors)."""


# ---------------------------------------------------------------------------------------------------
# The models of a folder, loaded on demand


class Models:
    """The parts of a model folder, each loaded on first use in `dtype` (a diffusers folder). `family`: "sd"
    (SD 1.x / 2.x / SDXL: a U-Net), "sd3" or "flux" (a transformer: refldm.crosscheck.vectors_flow)."""

    def __init__(self, folder, dtype="float64"):
        self.folder = os.fspath(folder)
        self.dtype = backend.resolve_dtype(dtype).name
        self._cache = {}
        if not os.path.isfile(os.path.join(self.folder, "model_index.json")):
            raise ValueError(f"{self.folder}: no model_index.json (give a diffusers model folder)")
        self.index = read_config(self.folder, "model_index.json")
        entry = self.index.get("transformer")
        self.family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(
            entry[-1] if isinstance(entry, list) and entry else None, "sd")
        self.configs = {}
        for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            entry = self.index.get(part)
            if entry and (not isinstance(entry, list) or entry[-1] is not None):
                self.configs[part] = read_config(os.path.join(self.folder, part))
        self.configs["scheduler"] = read_config(os.path.join(self.folder, "scheduler"), "scheduler_config.json")

    @property
    def xl(self) -> bool:
        return self.family == "sd" and "text_encoder_2" in self.configs

    @property
    def text_encoders(self) -> list:
        return [p for p in ("text_encoder", "text_encoder_2", "text_encoder_3") if p in self.configs]

    def is_t5(self, part: str) -> bool:
        """Whether text encoder (or tokenizer) `part` is T5: SD3's third, FLUX's second."""
        part = part.replace("tokenizer", "text_encoder")
        return (self.family, part) in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2"))

    def get(self, part: str):
        if part not in self._cache:
            path = os.path.join(self.folder, part)
            if self.family != "sd" and (part == "transformer" or self.is_t5(part) or part == "text_encoder"):
                self._cache[part] = vectors_flow.load_part(self, part, path)
                return self._cache[part]
            if part == "unet":
                from refldm.models.unet import UNet2DConditionModel as cls
            elif part == "vae":
                from refldm.models.vae import AutoencoderKL as cls
            elif part == "text_encoder_2":
                from refldm.models.clip import CLIPTextModelWithProjection as cls
            elif part == "text_encoder":
                from refldm.models.clip import CLIPTextModel as cls
            elif part.startswith("tokenizer"):
                from refldm.models.tokenizer import CLIPTokenizer
                self._cache[part] = CLIPTokenizer.from_pretrained(path)
                return self._cache[part]
            else:
                raise ValueError(f"unknown part {part!r}")
            self._cache[part] = cls.from_pretrained(path, dtype=self.dtype)
        return self._cache[part]

    def pipeline(self):
        if "pipeline" not in self._cache:
            if self.family != "sd":
                self._cache["pipeline"] = vectors_flow.load_pipeline(self)
                return self._cache["pipeline"]
            if self.xl:
                from refldm.pipelines.sdxl import StableDiffusionXLPipeline as cls
            else:
                from refldm.pipelines.sd import StableDiffusionPipeline as cls
            self._cache["pipeline"] = cls.from_pretrained(self.folder, dtype=self.dtype)
        return self._cache["pipeline"]


def config_hash(configs: dict) -> str:
    """SHA-256 of the model's configs as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Original key prefixes


def _original_tables(models: Models) -> dict:
    from refldm.checkpoints import convert
    if models.family != "sd":
        return {"family": models.family, "configs": models.configs, "tables": {}, "shape": None, "refiner": False}
    kind = "sd2" if models.configs.get("text_encoder", {}).get("hidden_act") == "gelu" else "sd1"
    tables = {"unet": "unet", "vae": "vae", "text_encoder": "xl_clip" if models.xl else
              ("open_clip" if kind == "sd2" else "clip"), "text_encoder_2": "xl_open_clip"}
    try:
        shape = convert.shape_of(models.configs)
    except (KeyError, convert.ConversionError):
        shape = None
    return {"tables": tables, "shape": shape, "refiner": models.xl and "text_encoder" not in models.configs}


def original_prefix(info: dict, part: str, layer: str, keys=()) -> str:
    """The original checkpoint key prefix of diffusers module `layer` of network `part` ("" when none maps).

    A module with weights of its own maps directly (``conv_in`` -> ``model.diffusion_model.input_blocks.0.0``);
    a container maps to the longest prefix shared by the original keys of the weights below it.
    """
    from refldm.checkpoints import convert
    if info.get("family", "sd") != "sd":
        return vectors_flow.original_prefix(info, part, layer, keys)
    if info["shape"] is None or part not in info["tables"]:
        return ""
    table = info["tables"][part]

    def one(key):
        try:
            t = convert.original_key(table, key, info["shape"])
        except convert.ConversionError:
            return None
        k = t.key
        if info["refiner"] and k.startswith(convert.XL_OPEN_CLIP_PREFIX):
            k = "conditioner.embedders.0.model." + k[len(convert.XL_OPEN_CLIP_PREFIX):]
        return k, t.third, t.transpose

    got = one(layer + ".weight") if layer else None
    if got and got[2]:  # OpenCLIP's text_projection: a bare parameter, stored transposed (x @ P)
        return got[0]
    if got and got[1] is None and got[0].endswith(".weight"):
        return got[0][: -len(".weight")]
    if got and got[1] is not None:
        return f"{got[0]}[{got[1]}/3 of the rows]"
    below = [one(k) for k in keys if k.startswith(layer + ".")] if layer else []
    below = [b[0] for b in below if b]
    if not below:
        return ""
    joined = vectors_flow.shared_key_prefix(below)
    network = convert._PREFIXES[table].rstrip(".")
    if info["refiner"] and table == "xl_open_clip":
        network = "conditioner.embedders.0.model"
    return "" if len(joined) <= len(network) else joined  # nothing more specific than the network itself


# ---------------------------------------------------------------------------------------------------
# Runners: one group's pass, on given inputs, recording every module. Shared by the golden generation and by
# `run_refldm` (refldm's own candidate), so both run exactly the same code on the same inputs.


def _record(fn, include=None):
    with Recorder(include) as rec:
        result = fn()
    return rec.activations, result


def _np(x):
    return np.asarray(backend.to_numpy(x))


def run_tokenizer(models, group, inputs):
    tok = models.get(group["args"]["tokenizer"])
    text = group["text"]
    if group["args"].get("webui"):
        from refldm.adapters.prompt_weighting import chunk_tokens
        chunks = chunk_tokens(tok, text)
        return {"ids": np.asarray([c[0] for c in chunks], dtype=np.int64),
                "weights": np.asarray([c[1] for c in chunks], dtype=np.float64)}
    length = group["args"].get("max_length")  # T5's: the pipeline's max_sequence_length
    out = tok([text], padding="max_length", truncation=True, return_tensors="np",
              **({"max_length": length} if length else {}))
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def run_text_encoder(models, group, inputs):
    model = models.get(group["args"]["encoder"])
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    acts, out = _record(lambda: model(ids, output_hidden_states=True))
    acts.pop("<root>", None)
    if models.is_t5(group["args"]["encoder"]):  # T5: every layer, then the final layer norm's output
        acts["last_hidden_state"] = _np(out.last_hidden_state)
        return acts
    acts["penultimate_hidden_state"] = _np(out.hidden_states[-2])
    acts["last_hidden_state"] = _np(out.last_hidden_state)
    acts["pooled"] = _np(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
    return acts


def run_vae(models, group, inputs):
    vae = models.get("vae")
    dt = models.dtype
    if group["args"]["direction"] == "encode":
        x = backend.asarray(inputs["images"], dtype=dt)
        acts, posterior = _record(lambda: vae.encode(x))
        acts["latent_dist.mean"] = _np(posterior.mean)
        acts["latent_dist.std"] = _np(posterior.std)
        return acts
    z = backend.asarray(inputs["latents"], dtype=dt)
    acts, image = _record(lambda: vae.decode(z))
    acts.pop("<root>", None)
    return acts


def run_unet(models, group, inputs):
    from refldm.core import ops
    unet = models.get("unet")
    dt = models.dtype
    cfg = unet.config
    t = np.asarray(inputs["timestep"], dtype=np.float64)
    sample = backend.asarray(inputs["sample"], dtype=dt)
    context = backend.asarray(inputs["encoder_hidden_states"], dtype=dt)
    added = None
    if "text_embeds" in inputs:
        added = {"text_embeds": backend.asarray(inputs["text_embeds"], dtype=dt),
                 "time_ids": backend.asarray(inputs["time_ids"], dtype="float64")}
    acts, out = _record(lambda: unet(sample, t, context, added_cond_kwargs=added))
    t_emb = ops.timestep_embedding(backend.asarray(t, dtype=dt), cfg.block_out_channels[0],
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
    first = {"time_proj": _np(t_emb)}
    root = acts.pop("<root>")
    first.update(acts)
    first["output"] = root
    return first


def _sampler(spec: str) -> tuple[str, dict]:
    """"euler|timestep_spacing=trailing" -> ("euler", {"timestep_spacing": "trailing"})."""
    name, *options = spec.split("|")
    out = {}
    for o in options:
        key, _, value = o.partition("=")
        out[key] = json.loads(value) if value in ("true", "false") or value.replace(".", "").isdigit() else value
    return name, out


def _sampler_key(spec: str) -> str:
    name, options = _sampler(spec)
    parts = [name.lower().replace(" ", "_").replace("+", "p")] + [str(v) for v in options.values()]
    return "_".join(parts)


def make_scheduler(models, spec: str):
    from refldm.schedulers import get_scheduler
    if models.family != "sd":
        return vectors_flow.make_flow_scheduler(_kit(), models, spec)
    name, options = _sampler(spec)
    return get_scheduler(name, models.configs["scheduler"], **options)


def _given_noise(noise, where):
    """A generator whose next draw is `noise` (the noise given for one scheduler call), then none."""
    from refldm.core.random import Generator

    class GivenNoise(Generator):
        def __init__(self):  # no stream of its own: the draw is given
            self.noise = noise

        def randn(self, shape, dtype="float32"):
            if self.noise is None:
                raise RuntimeError(f"{where}: the step drew noise twice; one draw per call is supported")
            value, self.noise = self.noise, None
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where}: the step drew noise of shape {tuple(shape)}, given {value.shape}")
            return np.asarray(value, dtype=dtype)

    return GivenNoise()


def run_scheduler(models, group, inputs):
    args = group["args"]
    sched = make_scheduler(models, args["sampler"])
    if models.family != "sd":
        vectors_flow.set_flow_timesteps(sched, args)
    else:
        sched.set_timesteps(args["steps"])
    out = {"timesteps": np.asarray(_np(sched.timesteps), dtype=np.float64)}
    if getattr(sched, "sigmas", None) is not None:
        out["sigmas"] = np.asarray(_np(sched.sigmas), dtype=np.float64)
    if not args.get("run"):
        return out
    out["init_noise_sigma"] = np.asarray(float(sched.init_noise_sigma), dtype=np.float64)
    dt = models.dtype
    prev = None
    for i, t in enumerate(list(sched.timesteps)):
        x = inputs.get(f"sample.{i}")  # given: the golden chain; absent: continue from the previous call
        x = prev if x is None else backend.asarray(x, dtype=dt)
        eps = backend.asarray(inputs[f"model_output.{i}"], dtype=dt)
        out[f"step{i}.scaled_model_input"] = _np(sched.scale_model_input(x, t))
        if f"noise.{i}" in inputs:  # a stochastic step: its noise draw returns the given noise
            g = _given_noise(np.asarray(inputs[f"noise.{i}"]), f"{group.get('id', 'scheduler')} call {i}")
            prev = sched.step(eps, t, x, generator=g).prev_sample
        else:
            prev = sched.step(eps, t, x).prev_sample
        out[f"step{i}.prev_sample"] = _np(prev)
    return out


def run_noise(models, group, inputs):
    from refldm.core.random import Generator
    seed = int(group["args"]["seed"])
    shape = tuple(group["args"]["shape"])
    out = {}
    if group["args"]["mode"] == "numpy":
        g = Generator(seed, mode="numpy")
        out["randn.float64"] = g.randn(shape, dtype="float64")
        return out
    for kernel in ("avx2", "scalar"):
        out[f"randn.float32.{kernel}"] = Generator(seed, kernel=kernel).randn(shape, dtype="float32")
    out["randn.float64"] = Generator(seed).randn(shape, dtype="float64")
    g = Generator(seed, kernel="avx2")
    out["randn.small"] = g.randn((7,), dtype="float32")       # under 16 values: scalar Box-Muller in double
    out["randn.small.then"] = g.randn((3,), dtype="float32")  # ... continuing with the cached second value
    out["randn.then"] = g.randn(shape, dtype="float32")       # the stream goes on where it stopped
    out["rand.float32"] = Generator(seed).rand(shape, dtype="float32")
    return out


PIPELINE_NAMES = ("steps.*.noise_pred", "steps.*.guided", "steps.*.prev_sample", "vae.decoder")


def run_pipeline(models, group, inputs):
    if models.family != "sd":
        return vectors_flow.run_flow_pipeline(_kit(), models, group, inputs)
    pipe = models.pipeline()
    args = group["args"]
    noise = np.asarray(inputs["noise"], dtype=np.float64)
    acts, out = _record(lambda: pipe(group["text"], negative_prompt="", height=args["size"], width=args["size"],
                                     num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"],
                                     latents=noise, sampler=args["sampler"], seed=0, progress=False),
                        include=PIPELINE_NAMES)
    return _pipeline_cases(acts, out, args["steps"])


def _pipeline_cases(acts: dict, out, steps: int) -> dict:
    """A recorded pipeline run -> its cases: each step's noise_pred, guided and prev_sample, the decoded image
    (float) and the 8-bit image (shared by the U-Net and the flow families' pipeline groups)."""
    result = {}
    for i in range(steps):
        for name in ("noise_pred", "guided", "prev_sample"):
            result[f"steps.{i}.{name}"] = acts[f"steps.{i}.{name}"]
    result["image"] = acts["vae.decoder"]
    result["image_uint8"] = np.asarray(out.images[0], dtype=np.uint8)
    return result


def run_transformer(models, group, inputs):
    """SD3 / FLUX: one transformer call (refldm/crosscheck/vectors_flow.py)."""
    return vectors_flow.run_transformer(_kit(), models, group, inputs)


def _kit():
    """This module, handed to vectors_flow for the runners and constants it shares (it cannot import us)."""
    return sys.modules[__name__]


RUNNERS = {"tokenizer": run_tokenizer, "text_encoder": run_text_encoder, "vae": run_vae, "unet": run_unet,
           "transformer": run_transformer, "scheduler": run_scheduler, "noise": run_noise, "pipeline": run_pipeline}


# ---------------------------------------------------------------------------------------------------
# Descriptions


def _describe(part: str, group: dict, layer: str) -> tuple[str, str]:
    """(one-line description, docs page) of a case."""
    page = DOC_PAGES[part]
    if part == "transformer" or group["args"].get("t5") or (part == "tokenizer" and group["args"].get("max_length")):
        return vectors_flow.describe(part, group, layer)
    if part == "tokenizer":
        what = {"input_ids": "token ids: [bos] + BPE ids + [eos], padded to 77 with the pad token",
                "attention_mask": "1 for bos, the tokens and eos, 0 for padding",
                "ids": "web-UI prompt syntax: chunks of [bos] + 75 tokens + [eos]",
                "weights": "web-UI prompt syntax: each token's attention weight (x1.1 per (), /1.1 per [])"}[layer]
        return f"{group['args']['tokenizer']}: {what}", page
    if part == "text_encoder":
        special = {"penultimate_hidden_state": "hidden_states[-2]: the second-to-last layer's output, before the "
                                               "final layer norm (SDXL, clip-skip)",
                   "last_hidden_state": "final_layer_norm of the last layer: what the U-Net attends to",
                   "pooled": "the final-layer-norm output at the end-of-text position (times text_projection "
                             "for a text encoder with projection)"}
        if layer in special:
            return special[layer], page
        return f"{group['args']['encoder']} module {layer}: its output (B, 77, D) unless noted by the shape", page
    if part == "vae":
        if layer.startswith("latent_dist"):
            return f"the posterior q(z|x): {layer.split('.')[-1]} of the diagonal Gaussian (before scaling_factor)", page
        return f"VAE {group['args']['direction']} module {layer}: its output", page
    if part == "unet":
        if layer == "time_proj":
            return "the sinusoidal timestep embedding [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half)", page
        if layer == "output":
            return "the U-Net's output: predicted noise (or v) for this timestep and text", page
        return f"U-Net module {layer}: its output (the first array of a block's tuple)", page
    if part == "scheduler":
        if layer in ("timesteps", "sigmas", "init_noise_sigma"):
            return f"{group['args']['sampler']} with {group['args']['steps']} steps: the {layer} table", page
        return f"{group['args']['sampler']}: {layer.split('.', 1)[1]} of call {layer.split('.')[0][4:]} " \
               "(step(model_output, t, sample) on the given inputs)", page
    if part == "noise":
        return f"seed {group['args']['seed']}: {layer} ({group['args']['mode']} stream)", page
    return f"pipeline with {group['args']['sampler']}, {group['args']['steps']} steps, CFG " \
           f"{group['args']['guidance_scale']}: {layer}", page


def _tolerance(part: str, layer: str) -> dict:
    if part == "tokenizer":
        key = "prompt_weights" if layer == "weights" else "tokens"
    elif part == "scheduler":
        key = "scheduler_table" if "." not in layer else "scheduler_step"
    elif part == "pipeline" and layer == "image_uint8":
        key = "image_uint8"
    else:
        key = part
    return dict(zip(PRECISIONS, TOLERANCES[key]))


def _module(part: str, group: dict, layer: str) -> str:
    """The diffusers / transformers module path that produces `layer` ("" for a value no module returns)."""
    if part == "unet":
        return "" if layer == "output" else layer
    if part == "transformer":
        return "" if layer in ("output", "pos_embed.sin") else layer
    if part == "text_encoder":
        if layer in ("penultimate_hidden_state", "last_hidden_state", "pooled"):
            return ""
        if group["args"].get("t5"):
            return layer
        # transformers 5 nests the layers under text_model in CLIPTextModelWithProjection, not in CLIPTextModel
        nested = group["args"].get("projection", group["args"]["encoder"] == "text_encoder_2") \
            and not layer.startswith("text_projection")
        return "text_model." + layer if nested else layer
    if part == "vae":
        return "" if layer.startswith("latent_dist") else layer
    return ""


# ---------------------------------------------------------------------------------------------------
# Generation


def _test_image(size: int) -> np.ndarray:
    """A fixed (1, 3, S, S) image in [-1, 1]: colour gradients, a disc and stripes (no randomness)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    r = 2 * x - 1
    g = np.clip(2 * y - 1 + 0.5 * disc, -1, 1)
    b = np.cos(12 * np.pi * x) * 0.8 * (1 - disc)
    return np.stack([r, g, b])[None]


class _Writer:
    """Collects groups, cases and tensors, then writes the bundle."""

    def __init__(self, models, options):
        self.models = models
        self.options = options
        self.groups, self.cases, self.tensors = [], [], {p: {} for p in PARTS}
        self.info = _original_tables(models)
        self.hash = config_hash(models.configs)
        self.keys = {}

    def _keys(self, part):
        if part not in self.keys:
            model = self.models.get(part) if part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2",
                                                      "text_encoder_3") else None
            self.keys[part] = [k for k, *_ in model.params()] if model is not None else []
        return self.keys[part]

    def add(self, part, gid, args, inputs, text=None, seed=None, net=None, keep=None):
        """Run group `gid` on `inputs` and add its outputs as cases (those `keep(layer)` accepts); returns
        every output."""
        group = {"id": gid, "part": part, "args": args, "inputs": {}}
        if text is not None:
            group["text"] = text
            inputs = dict(inputs)
            inputs["text"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
        for name, value in inputs.items():
            tname = f"{gid}/input/{name}"
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and name != "timestep":
                arr = arr.astype(self.models.dtype)
            self.tensors[part][tname] = arr
            group["inputs"][name] = tname
        outputs = RUNNERS[part](self.models, group, {k: self.tensors[part][v] for k, v in group["inputs"].items()})
        self.groups.append(group)
        net = net or part
        for layer, value in outputs.items():
            if keep is not None and not keep(layer):
                continue
            value = np.ascontiguousarray(value)
            name = f"{gid}/{layer}"
            desc, page = _describe(part, group, layer)
            module = _module(part, group, layer)
            orig = original_prefix(self.info, net, module.removeprefix("text_model."), self._keys(net)) \
                if module else ""
            self.tensors[part][name] = value
            self.cases.append({
                "name": name, "group": gid, "part": part, "layer": layer, "module": module, "original": orig,
                "inputs": _case_inputs(part, layer, group),
                "output": name, "file": f"{part}.safetensors", "shape": list(value.shape), "dtype": value.dtype.name,
                "tolerance": _tolerance(part, layer), "description": desc, "docs": DOCS + page,
                "provenance": {"refldm": __version__, "config_sha256": self.hash,
                               "seed": SEED if seed is None else seed}})
        return outputs

    def write(self, out_dir, extra: dict):
        os.makedirs(out_dir, exist_ok=True)
        files = {}
        for part, tensors in self.tensors.items():
            if tensors:
                fname = f"{part}.safetensors"
                save_file(tensors, os.path.join(out_dir, fname), {"format": FORMAT, "part": part})
                files[part] = fname
        manifest = {"format": FORMAT, "refldm_version": __version__,
                    "relative_error": "rel = max|a - b| / max|b| over the case's elements, in float64 "
                                      "(b the golden tensor; max|b| is 255 for uint8 images); a case passes "
                                      "when rel <= tolerance[the precision the port computes in]",
                    **extra, "config_sha256": self.hash, "configs": self.models.configs, "files": files,
                    "groups": self.groups, "cases": self.cases}
        text = json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        from refldm.files import atomic_write
        atomic_write(os.path.join(out_dir, "manifest.json"), lambda f: f.write(text.encode("utf-8")))
        return manifest


def _parts(parts) -> list:
    if parts is None:
        return list(PARTS)
    parts = [parts] if isinstance(parts, str) else list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]  # data-flow order whatever the order given


def generate(folder, out_dir, parts=None, dtype="float64", size: int | None = None, steps: int = 4,
             prompts=None, name: str | None = None, samplers=SAMPLERS, pipeline_samplers=PIPELINE_SAMPLERS,
             timesteps=TIMESTEPS, detail: str = "all", extra: dict | None = None,
             max_sequence_length: int | None = None) -> dict:
    """Write a conformance bundle of the diffusers model `folder` to `out_dir`; returns the manifest.

    parts: which of `PARTS` (default all); dtype: the goldens' dtype (float64); size: image side in pixels
    (default 8 latent pixels' worth); steps: sampler steps for the scheduler and pipeline cases;
    prompts: the prompt suite (default `PROMPTS`); detail: "all" (every module) or "blocks" (modules at
    most four names deep: blocks, resnets, attentions; the choice for a full-size model);
    max_sequence_length: T5's token count (SD3 / FLUX; default the pipeline's, 32 for a tiny model).
    """
    parts = _parts(parts)
    dtype = backend.resolve_dtype(dtype).name
    if dtype not in ("float64", "float32"):
        raise ValueError(f"--dtype {dtype}: goldens are float64 (default) or float32")
    if detail not in ("all", "blocks"):
        raise ValueError(f"detail={detail!r}; choose 'all' or 'blocks'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    models = Models(folder, dtype)
    prompts = list(PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("the prompt suite must hold at least one prompt")
    vae_cfg = models.configs["vae"]
    factor = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    size = int(size or 8 * factor)
    if size < factor or size % factor:
        raise ValueError(f"--size {size} must be a positive multiple of the VAE's factor {factor}")
    options = {"parts": parts, "dtype": dtype, "size": size, "steps": steps, "seed": SEED, "detail": detail,
               "prompts": prompts}
    w = _Writer(models, options)
    # "blocks": the U-Net's and the VAE's modules at most four names deep (blocks, resnets, attentions)
    keep = None if detail == "all" else (lambda layer: len(layer.split(".")) <= 4)
    rng = np.random.default_rng(SEED)
    latent = size // factor
    if models.family != "sd":  # SD3 / FLUX: refldm/crosscheck/vectors_flow.py, the same writer
        length = max_sequence_length or vectors_flow.t5_length(models.family, bool((extra or {}).get("tiny")))
        if not 1 <= length <= 512:
            raise ValueError(f"max_sequence_length {length} must lie in 1..512 (T5's limit in SD3 and FLUX)")
        options["max_sequence_length"] = length
        vectors_flow.generate_flow(_kit(), w, models, parts, prompts, size, steps, latent, keep, timesteps, length)
        meta = {"model": {"name": name or os.path.basename(os.path.normpath(models.folder)),
                          "tiny": (extra or {}).get("tiny")}, "options": options}
        meta.update({k: v for k, v in (extra or {}).items() if k != "tiny"})
        return w.write(out_dir, meta)
    text_prompts = [prompts[i] for i in TEXT_PROMPTS if i < len(prompts)] or prompts[:1]
    tokens, encoded = {}, {}
    toks = [p.replace("text_encoder", "tokenizer") for p in models.text_encoders]

    # 1. tokenizer(s): ids and masks over the prompt suite; the web UI's weighting
    for tok in toks:
        for i, p in enumerate(prompts):
            gid = f"{tok}.p{i:02d}"
            if "tokenizer" in parts:
                out = w.add("tokenizer", gid, {"tokenizer": tok}, {}, text=p)
            else:
                out = run_tokenizer(models, {"args": {"tokenizer": tok}, "text": p}, {})
            tokens[(tok, p)] = out["input_ids"]
        if "tokenizer" in parts:
            for i in WEBUI_PROMPTS:
                if i < len(prompts):
                    w.add("tokenizer", f"{tok}.webui.p{i:02d}", {"tokenizer": tok, "webui": True}, {}, text=prompts[i])
    # 2. text encoder(s): every layer, penultimate, last, pooled
    for enc, tok in zip(models.text_encoders, toks):
        for j, p in enumerate(text_prompts):
            ids = tokens[(tok, p)]
            if "text_encoder" in parts:
                out = w.add("text_encoder", f"{enc}.p{prompts.index(p):02d}", {"encoder": enc},
                            {"input_ids": ids}, net=enc)
            else:
                out = run_text_encoder(models, {"args": {"encoder": enc}}, {"input_ids": ids})
            encoded[(enc, j)] = out
    # 3. VAE: encode the fixed image, decode its posterior mean
    if "vae" in parts:
        enc_out = w.add("vae", "vae.encode", {"direction": "encode"}, {"images": _test_image(size)}, keep=keep)
        w.add("vae", "vae.decode", {"direction": "decode"}, {"latents": enc_out["latent_dist.mean"]}, keep=keep)
    # 4. U-Net: every module at a few timesteps, cond and uncond
    if "unet" in parts:
        cfg = models.configs["unet"]
        sample = rng.standard_normal((1, cfg.get("in_channels", 4), latent, latent))
        if cfg.get("in_channels", 4) == 9:  # inpainting: latents, a mask (left half), masked-image latents
            sample[:, 4] = 0.0
            sample[:, 4, :, : latent // 2] = 1.0
        for j, cond in enumerate(("cond", "uncond")):
            j = min(j, len(text_prompts) - 1)
            if models.xl:
                context = np.concatenate([encoded[(e, j)]["penultimate_hidden_state"] for e in models.text_encoders],
                                         axis=-1)
                extra_in = {"text_embeds": encoded[("text_encoder_2", j)]["pooled"]}
                n_ids = (cfg["projection_class_embeddings_input_dim"] - extra_in["text_embeds"].shape[-1]) \
                    // cfg["addition_time_embed_dim"]
                ids = [size, size, 0, 0, size, size] if n_ids == 6 else [size, size, 0, 0, 6.0]
                extra_in["time_ids"] = np.asarray([ids], dtype=np.float64)
            else:
                context = encoded[(models.text_encoders[0], j)]["last_hidden_state"]
                extra_in = {}
            for t in timesteps:
                w.add("unet", f"unet.t{t}.{cond}", {"timestep": t, "cond": cond},
                      {"sample": sample, "timestep": np.asarray([float(t)]), "encoder_hidden_states": context,
                       **extra_in}, keep=keep)
    # 5. schedulers: tables for a few step counts; steps on fixed model outputs
    if "scheduler" in parts:
        shape = (1, 4, latent, latent)
        for s in samplers:
            key = _sampler_key(s)
            for n in sorted({steps, *TABLE_STEPS}):
                if n != steps:
                    w.add("scheduler", f"scheduler.{key}.n{n}", {"sampler": s, "steps": n, "run": False}, {})
                    continue
                sched = make_scheduler(models, s)
                sched.set_timesteps(n)
                calls = len(sched.timesteps)
                srng = np.random.default_rng(SEED + 1)
                x = srng.standard_normal(shape) * float(sched.init_noise_sigma)
                eps = [srng.standard_normal(shape) for _ in range(calls)]
                # the sample of call i is the golden prev_sample of call i - 1: run the chain once to get them
                inputs = {"sample.0": x, **{f"model_output.{i}": eps[i] for i in range(calls)}}
                if _sampler(s)[0] in STOCHASTIC:
                    inputs.update({f"noise.{i}": srng.standard_normal(shape) for i in range(calls)})
                args = {"sampler": s, "steps": n, "run": True}
                chain = run_scheduler(models, {"args": args}, inputs)
                for i in range(1, calls):
                    inputs[f"sample.{i}"] = chain[f"step{i - 1}.prev_sample"]
                w.add("scheduler", f"scheduler.{key}.n{n}", args, dict(sorted(inputs.items(), key=_call_order)))
    # 6. noise streams
    if "noise" in parts:
        shape = [1, 4, latent, latent]
        for s in NOISE_SEEDS:
            w.add("noise", f"noise.torch.seed{s}", {"seed": s, "mode": "torch", "shape": shape},
                  {"seed": np.asarray([s], dtype=np.uint64)}, seed=s)
        w.add("noise", "noise.numpy.seed42", {"seed": 42, "mode": "numpy", "shape": shape},
              {"seed": np.asarray([42], dtype=np.uint64)}, seed=42)
    # 7. the whole pipeline
    if "pipeline" in parts and not (models.xl and "text_encoder" not in models.configs) \
            and models.configs["unet"].get("in_channels", 4) == 4:
        from refldm.core.random import Generator
        noise = Generator(SEED).randn((1, 4, latent, latent), dtype="float32").astype(np.float64)
        for s in pipeline_samplers:
            key = _sampler_key(s)
            w.add("pipeline", f"pipeline.{key}", {"sampler": s, "steps": steps, "size": size, "guidance_scale": 7.5,
                                                  "negative_prompt": ""},
                  {"noise": noise}, text=prompts[0])
    meta = {"model": {"name": name or os.path.basename(os.path.normpath(models.folder)),
                      "tiny": (extra or {}).get("tiny")}, "options": options}
    meta.update({k: v for k, v in (extra or {}).items() if k != "tiny"})
    return w.write(out_dir, meta)


def _call_order(item):
    name, _ = item
    stem, _, i = name.partition(".")
    return (int(i) if i.isdigit() else -1, {"sample": 0, "model_output": 1}.get(stem, 2))


def _case_inputs(part: str, layer: str, group: dict) -> list:
    """The tensor names of a case's inputs: the group's, in call order; a scheduler call's own two."""
    names = group["inputs"]
    if part == "tokenizer":
        return [names["text"]]
    if part == "scheduler":
        if "." not in layer:
            return []  # tables: set_timesteps(steps) alone
        i = layer.split(".")[0][len("step"):]
        return [names[f"sample.{i}"], names[f"model_output.{i}"]] + ([names[f"noise.{i}"]] if f"noise.{i}" in names
                                                                      else [])  # earlier calls first: multistep state
    return [v for k, v in names.items() if k != "text"]


def generate_tiny(kind: str, out_dir, **kwargs) -> dict:
    """A bundle of refldm's tiny `kind` model (refldm.crosscheck.tiny), its weights in ``out_dir/model``."""
    from refldm.crosscheck import tiny
    model_dir = os.path.join(os.fspath(out_dir), "model")
    tiny.build(kind, model_dir)
    kwargs.setdefault("size", 16)
    kwargs.setdefault("steps", 3)
    weights = {"diffusers": "model", "original": "model/original.safetensors",
               "how": f"refldm vectors --tiny {kind} (refldm.crosscheck.tiny.build, seed {tiny.SEED})"}
    return generate(model_dir, out_dir, name=f"tiny-{kind}", extra={"tiny": kind, "weights": weights}, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Reading a bundle


@dataclasses.dataclass
class CaseResult:
    """How a candidate output compares with a case's golden output."""

    name: str
    status: str            # "pass", "FAIL", "not provided"
    max_abs: float = math.nan
    rel: float = math.nan
    tolerance: float = math.nan
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def score(case, output, precision: str = "float32") -> CaseResult:
    """Score one candidate array against a case: rel = max|a - b| / max|b| in float64 against the case's
    tolerance for `precision`. Another size fails naming the expected shape; the same size in another view
    is compared row-major (noted); NaN / inf where the golden value is finite fails naming the index; a
    dtype that is no real number fails."""
    if precision not in ("float32", "float16", "float64"):
        raise ValueError(f"precision={precision!r}; choose 'float32', 'float16' or 'float64'")
    tol = float(case.tolerance[precision])
    expected = np.asarray(case.expected)
    a = np.asarray(backend.to_numpy(output)) if hasattr(output, "shape") else np.asarray(output)
    if a.dtype.kind not in "biuf":
        return CaseResult(case.name, "FAIL", math.inf, math.inf, tol,
                          f"dtype {a.dtype} is not a real number type (expected {expected.dtype.name}, "
                          f"shape {tuple(expected.shape)})")
    shape, want = tuple(a.shape), tuple(expected.shape)
    note = ""
    if shape != want:
        if a.size != expected.size:
            return CaseResult(case.name, "FAIL", math.inf, math.inf, tol,
                              f"shape {shape}, expected {want}")
        # the same number of values in another view ((N, C, H*W) for (N, C, H, W), a dropped batch axis):
        # compared in row-major order, so a real layout difference still fails on the values
        note = f"shape {shape} compared row-major as {want}"
        a = a.reshape(want)
    a = a.astype(np.float64)
    b = expected.astype(np.float64)
    bad = ~np.isfinite(a) & np.isfinite(b)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(a[where]) else "inf"
        return CaseResult(case.name, "FAIL", math.inf, math.inf, tol,
                          f"{kind} at index {where} ({int(bad.sum())} non-finite values)")
    if a.size == 0:
        return CaseResult(case.name, "pass", 0.0, 0.0, tol, note)
    max_abs = float(np.max(np.abs(a - b)))
    max_ref = 255.0 if expected.dtype == np.uint8 else float(np.max(np.abs(b)))  # 8-bit images: levels / 255
    rel = (0.0 if max_abs == 0 else math.inf) if max_ref == 0 else max_abs / max_ref
    return CaseResult(case.name, "pass" if rel <= tol else "FAIL", max_abs, rel, tol, note)


class Case:
    """One case of a bundle: its manifest entry, its inputs and golden output as arrays, `check`."""

    def __init__(self, bundle, index: int, entry: dict):
        self.bundle = bundle
        self.index = index
        self.entry = entry
        for key in ("name", "group", "part", "layer", "module", "original", "shape", "dtype", "tolerance",
                    "description", "docs"):
            setattr(self, key, entry.get(key))

    @property
    def input_names(self) -> list:
        """The names of the case's inputs, in call order ("sample", "timestep", ...; "text" for the tokenizer)."""
        return [n.split("/input/", 1)[1] for n in self.entry["inputs"]]

    @property
    def inputs(self) -> list:
        """The case's inputs in call order, as arrays (the tokenizer's input is the prompt, a str). A
        scheduler call's inputs are (sample, model_output); its timestep is the table's entry of that call."""
        if self.part == "tokenizer":
            return [self.bundle.group(self.group)["text"]]
        return [self.bundle.tensor(self.part, n) for n in self.entry["inputs"]]

    @property
    def input_dict(self) -> dict:
        return dict(zip(self.input_names, self.inputs))

    @property
    def expected(self) -> np.ndarray:
        return self.bundle.tensor(self.part, self.entry["output"])

    def score(self, output, precision: str = "float32") -> CaseResult:
        """Compare `output` with the golden output (see `score`)."""
        return score(self, output, precision)

    def check(self, output, precision: str = "float32", strict: bool = True) -> CaseResult:
        """Score `output`; with strict (default) a failure raises `VectorMismatch` naming the case."""
        r = self.score(output, precision)
        if strict and not r.ok:
            raise VectorMismatch(f"{self.name}: rel {r.rel:.3e} > tolerance {r.tolerance:.1e} ({precision})"
                                 + (f"; {r.note}" if r.note else ""))
        return r

    def __repr__(self):
        return f"Case(#{self.index} {self.name}, shape {tuple(self.shape)})"


class Bundle:
    """A conformance bundle read from a folder: ``for case in bundle``, `cases_of(group)`, `case(name)`."""

    def __init__(self, folder, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.cases = [Case(self, i, e) for i, e in enumerate(manifest["cases"])]
        self._by_name = {c.name: c for c in self.cases}
        self._groups = {g["id"]: g for g in manifest["groups"]}
        self._files = {}

    def __iter__(self):
        return iter(self.cases)

    def __len__(self):
        return len(self.cases)

    def case(self, name: str) -> Case:
        if name not in self._by_name:
            raise KeyError(f"the bundle has no case {name!r}")
        return self._by_name[name]

    def group(self, gid: str) -> dict:
        return self._groups[gid]

    @property
    def groups(self) -> list:
        return self.manifest["groups"]

    def cases_of(self, gid: str) -> list:
        return [c for c in self.cases if c.group == gid]

    @property
    def model_folder(self):
        """The folder of the model's weights inside the bundle (tiny bundles), else None."""
        w = self.manifest.get("weights") or {}
        path = os.path.join(self.folder, w["diffusers"]) if w.get("diffusers") else None
        return path if path and os.path.isdir(path) else None

    def tensors(self, part: str) -> dict:
        if part not in self._files:
            fname = self.manifest["files"].get(part)
            if fname is None:
                raise BundleError(f"{self.folder}: manifest.json lists no tensor file for part {part!r}")
            path = os.path.join(self.folder, fname)
            if not os.path.isfile(path):
                raise BundleError(f"{path}: missing (the bundle's manifest.json lists it)")
            try:
                self._files[part] = load_file(path)
            except (ValueError, OSError) as e:
                raise BundleError(f"{path}: unreadable tensor file ({str(e).splitlines()[0]})") from None
        return self._files[part]

    def tensor(self, part: str, name: str) -> np.ndarray:
        tensors = self.tensors(part)
        if name not in tensors:
            raise BundleError(f"{os.path.join(self.folder, self.manifest['files'][part])}: no tensor {name!r} "
                              "(the manifest lists it)")
        return tensors[name]


def load(folder) -> Bundle:
    """Read a bundle's manifest (tensors are read on first use); BundleError names what is wrong."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "manifest.json")
    if not os.path.isdir(folder):
        raise BundleError(f"{folder}: no such bundle folder")
    if not os.path.isfile(path):
        raise BundleError(f"{folder}: no manifest.json (not a refldm vectors bundle)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise BundleError(f"{path}: no 'format' field (not a refldm vectors manifest)")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{path}: format {manifest['format']!r}; this refldm ({__version__}) reads {FORMAT!r}")
    for key in ("cases", "groups", "files"):
        if not isinstance(manifest.get(key), (list, dict)):
            raise BundleError(f"{path}: the {key!r} field is missing or malformed")
    for part, fname in manifest["files"].items():
        if not os.path.isfile(os.path.join(folder, fname)):
            raise BundleError(f"{os.path.join(folder, fname)}: missing (manifest.json lists it)")
        try:
            read_header(os.path.join(folder, fname))
        except (ValueError, OSError) as e:
            raise BundleError(f"{os.path.join(folder, fname)}: corrupt tensor file ({str(e).splitlines()[0]})") \
                from None
    return Bundle(folder, manifest)


# ---------------------------------------------------------------------------------------------------
# refldm as a candidate: its own outputs on the bundle's inputs


def run_refldm(bundle, dtype="float32", model=None, models=None, parts=None) -> dict:
    """{case name: array}: refldm run in `dtype` on every group's stored inputs (the candidate format).

    model: the model folder (default: the bundle's own weights); models: a ready `Models` (a test nudges
    a weight in it).
    """
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load(bundle)
    if models is None:
        folder = model or bundle.model_folder
        if folder is None:
            raise ValueError(f"{bundle.folder}: the bundle holds no weights; give the model folder")
        models = Models(folder, dtype)
    out = {}
    wanted = {c.name for c in bundle.cases}
    for group in bundle.groups:
        part = group["part"]
        if parts and part not in parts:
            continue
        inputs = {k: bundle.tensor(part, v) for k, v in group["inputs"].items()}
        for layer, value in RUNNERS[part](models, group, inputs).items():
            name = f"{group['id']}/{layer}"
            if name in wanted:
                out[name] = np.ascontiguousarray(_np(value))
    return out


def save_candidate(path, tensors: dict) -> None:
    """Write {case name: array} as a candidate safetensors file (what `refldm verify` reads)."""
    save_file(tensors, path, {"format": "refldm-candidate/1"})
