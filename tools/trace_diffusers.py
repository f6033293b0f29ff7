"""Trace a diffusers / transformers model with the names refldm uses, and compare with a refldm trace.

    refldm trace MODEL --part unet --dtype float64 -o refldm.safetensors
    python tools/trace_diffusers.py refldm.safetensors MODEL -o diffusers.safetensors

The second command reads the part, the dtype and the inputs from the refldm trace file, loads the same
weights into diffusers (UNet2DConditionModel, AutoencoderKL) or transformers (CLIPTextModel), puts a
forward hook on every module whose name (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``)
the refldm trace also records, runs the same inputs, writes the diffusers trace and prints the
layer-by-layer comparison (refldm against diffusers as the reference). Exit status 1 when a layer is
over the tolerance (default 1e-10 in float64, 1e-4 in float32, 1e-2 in float16).

Forward hooks fire when a module's forward returns, children before parents: the same order in which
refldm records, so a module called several times gets the same ``#2``, ``#3`` names on both sides.

Precision: diffusers computes the sinusoidal timestep embedding in float32 even in a float64 model.
In float64 this tool patches diffusers' ``get_timestep_embedding`` to compute in float64 (the same
formula), so a float64 comparison measures the implementations, not that float32 step
(``--keep-float32-timestep`` turns the patch off).

This is a tool, not part of refldm: it imports torch, diffusers and transformers (the crosscheck extra).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm.core import record
from refldm.crosscheck import trace as rtrace
from refldm.crosscheck.compare import compare

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}


def torch_dtype(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}[name]


def load_model(folder, part: str, dtype: str = "float64"):
    """The diffusers / transformers model for `part`, from a model or pipeline folder, in `dtype`, eval mode."""
    folder = rtrace.part_folder(folder, part)
    if part == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif part.startswith("vae"):
        from diffusers import AutoencoderKL as cls
    elif part == "text-encoder-2":
        from transformers import CLIPTextModelWithProjection as cls
    else:
        from transformers import CLIPTextModel as cls
    if part.startswith("text-encoder"):
        return cls.from_pretrained(folder).to(torch_dtype(dtype)).eval()
    return cls.from_pretrained(folder, torch_dtype=torch_dtype(dtype)).eval()


def _timestep_embedding_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                                scale=1, max_period=10000):
    """diffusers' get_timestep_embedding computed in float64 (the same formula):

        freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),  i = 0 .. half-1
        emb = [sin(scale * t * freq), cos(scale * t * freq)]   (cos first when flip_sin_to_cos)
    """
    import torch

    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    emb = scale * timesteps[:, None].to(torch.float64) * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


@contextlib.contextmanager
def float64_timestep_embedding(enabled: bool = True):
    """Patch diffusers' sinusoidal timestep embedding to compute in float64 for the duration."""
    if not enabled:
        yield
        return
    from diffusers.models import embeddings

    original = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = _timestep_embedding_float64
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original


def module_names(model) -> list:
    """The names worth recording when no refldm trace says which: modules that hold weights, and the root."""
    return [name for name, m in model.named_modules() if name == "" or any(True for _ in m.parameters())]


def hook_trace(model, run, names=None) -> dict:
    """Run ``run()`` with forward hooks on `model`'s modules named in `names`; {name: NumPy array}.

    `names`: trace names (``#n`` suffixes and ``<root>`` allowed); default: `module_names(model)`.
    Outputs are recorded like refldm's: the main array of the output, in hook order, repeats as ``#n``.
    """
    import torch

    wanted = {record.base_name(n) for n in (names if names is not None else module_names(model))}
    wanted = {"" if n == record.ROOT else n for n in wanted}
    recorder = record.Recorder()
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            array = record.main_array(output)
            if isinstance(array, torch.Tensor):
                recorder.record(name, array.detach().cpu().numpy())
        return hook

    try:
        for name, module in model.named_modules():
            # transformers' CLIPTextModelWithProjection nests the encoder under text_model; refldm's does not
            name = name.removeprefix("text_model.") if name.startswith("text_model.") else name
            if name in wanted:
                handles.append(module.register_forward_hook(hook_for(name)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return recorder.activations


def run_part(model, part: str, inputs: dict, dtype: str):
    """Run `part` of a diffusers / transformers model on NumPy inputs, as refldm's `run_part` does."""
    import torch

    dt = torch_dtype(dtype)

    def arr(name, d=dt):
        return torch.from_numpy(np.ascontiguousarray(inputs[name])).to(d)

    if part == "unet":
        added = {k: arr(k, torch.float64 if k == "time_ids" else dt) for k in rtrace.SDXL_UNET_INPUTS if k in inputs}
        return model(arr("sample"), arr("timestep", torch.float64), encoder_hidden_states=arr("encoder_hidden_states"),
                     added_cond_kwargs=added or None)
    if part == "vae-encode":
        return model.encode(arr("images"))
    if part == "vae-decode":
        return model.decode(arr("latents"))
    if part in ("text-encoder", "text-encoder-2"):
        return model(torch.from_numpy(np.asarray(inputs["input_ids"], dtype=np.int64)))
    raise ValueError(f"unknown part {part!r}")


def trace_like(reference: rtrace.Trace, folder=None, model=None, names=None,
               float64_timestep: bool = True, dtype: str | None = None) -> rtrace.Trace:
    """Trace the diffusers model of `folder` (or `model`) on the part, dtype and inputs of `reference`.

    Records the names of `reference` (or `names`); returns a `refldm.crosscheck.trace.Trace` with the same metadata
    layout, producer "diffusers <version>". `dtype` overrides the reference's dtype (e.g. run diffusers
    in float32 to measure it against a float64 golden trace).
    """
    import diffusers
    import torch

    part = reference.metadata.get("part")
    dtype = dtype or reference.metadata.get("dtype", "float32")
    if part not in rtrace.PARTS:
        raise ValueError(f"{reference.path or 'reference trace'}: metadata 'part' is {part!r}; "
                         f"expected one of {', '.join(rtrace.PARTS)} (was it written by `refldm trace`?)")
    if model is None:
        if folder is None:
            raise ValueError("trace_like needs a model folder or a loaded model")
        model = load_model(folder, part, dtype)
    names = list(reference.activations) if names is None else names
    inputs = reference.inputs
    with float64_timestep_embedding(float64_timestep and dtype == "float64"), torch.no_grad():
        activations = hook_trace(model, lambda: run_part(model, part, inputs, dtype), names)
    meta = {k: v for k, v in reference.metadata.items() if k not in ("format", "order", "inputs", "backend")}
    meta["producer"] = f"diffusers {diffusers.__version__}, torch {torch.__version__}"
    meta["dtype"] = dtype
    meta["float64_timestep_embedding"] = str(bool(float64_timestep and dtype == "float64"))
    return rtrace.Trace(activations, inputs, meta)


def _float64_schedule(scheduler):
    """Rebuild a diffusers scheduler's beta / alpha tables in float64 (diffusers builds them in float32).

        linear:         beta_i = beta_start + (beta_end - beta_start) * i / (N - 1)
        scaled_linear:  beta_i = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * i / (N - 1))^2
        alpha_bar_t = prod_{i <= t} (1 - beta_i)
    Schedulers that turn the table into float32 sigmas in set_timesteps (Euler, Heun, DPM-Solver, ...)
    still step in float32; DDIM and DDPM step in float64 after this.
    """
    import torch

    c = scheduler.config
    n = c.num_train_timesteps
    if c.get("trained_betas") is not None or c.beta_schedule not in ("linear", "scaled_linear"):
        return scheduler
    if c.beta_schedule == "linear":
        betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float64)
    else:
        betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    if hasattr(scheduler, "final_alpha_cumprod"):
        one = torch.tensor(1.0, dtype=torch.float64)
        scheduler.final_alpha_cumprod = one if c.get("set_alpha_to_one") else scheduler.alphas_cumprod[0]
    return scheduler


class _StepCounter:
    i = 0


class _RecordingScheduler:
    """Stands in for diffusers' scheduler in its pipeline (whose code cannot call `refldm.core.record`): records
    each step's input latents, guided noise prediction and outputs under the names refldm's sampler uses
    (`refldm.pipelines.sampling.sample`), and counts steps."""

    def __init__(self, scheduler, counter: _StepCounter):
        import functools

        self._scheduler, self._counter = scheduler, counter

        @functools.wraps(scheduler.step)  # diffusers inspects step's signature: it sees the real one
        def step(model_output, t, sample, *args, **kwargs):
            return self._step(model_output, t, sample, *args, **kwargs)

        self.step = step

    def _step(self, model_output, t, sample, *args, **kwargs):
        i = self._counter.i
        record.value(f"steps.{i}.latents", sample)
        record.value(f"steps.{i}.guided", model_output)  # the noise prediction after classifier-free guidance
        out = self._scheduler.step(model_output, t, sample, *args, **kwargs)
        record.value(f"steps.{i}.prev_sample", getattr(out, "prev_sample", out))
        original = getattr(out, "pred_original_sample", None)
        if original is None and isinstance(out, tuple) and len(out) > 1:  # diffusers' return_dict=False
            original = out[1]
        record.value(f"steps.{i}.pred_original_sample", original)
        self._counter.i += 1
        return out

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def trace_pipeline_like(reference: rtrace.Trace, folder, float64_timestep: bool = True) -> rtrace.Trace:
    """Run diffusers' StableDiffusionPipeline as `refldm.crosscheck.trace.trace_pipeline` ran refldm's, with the same names.

    Same prompt, negative prompt, size, steps, guidance scale and starting noise (``input/noise``); the
    torch generator is seeded and advanced past that noise, as refldm's was. The scheduler is the folder's
    (or the diffusers class the reference names). In float64 the timestep embedding and the scheduler's
    beta tables are computed in float64 (see `float64_timestep_embedding`, `_float64_schedule`).
    """
    import diffusers
    import torch

    meta = reference.metadata
    if meta.get("part") != "pipeline":
        raise ValueError(f"{reference.path or 'reference trace'}: not a pipeline trace (part {meta.get('part')!r})")
    dtype = meta.get("dtype", "float32")
    dt = torch_dtype(dtype)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False).to(dt)
    name = meta.get("scheduler")
    if name and name != "None" and name != type(pipe.scheduler).__name__:
        options = {}
        if not hasattr(diffusers, name):  # a web-UI / refldm sampler name ("euler", "DPM++ 2M Karras"), as the CLI takes
            from refldm.schedulers import names
            cls_name, options, _, _ = names.resolve(name)
            if not hasattr(diffusers, cls_name):
                raise ValueError(f"sampler {name!r} of the reference trace is refldm's {cls_name}, which diffusers "
                                 "has not (k-diffusion's sampler): no diffusers run to compare with")
            name = cls_name
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
    scheduler = _float64_schedule(pipe.scheduler) if dtype == "float64" else pipe.scheduler
    counter = _StepCounter()
    object.__setattr__(pipe, "scheduler", _RecordingScheduler(scheduler, counter))

    recorder = record.Recorder(include=None)
    wanted = [record.base_name(n) for n in reference.activations]
    unet_layers = {n.split(".unet.", 1)[1] for n in wanted if n.startswith("steps.") and ".unet." in n}
    if any(n.startswith("steps.") and n.endswith(".unet") for n in wanted):
        unet_layers.add("")  # the U-Net's own output under its scope name
    handles = []

    def hook(name_of):
        def run(module, args, output):
            array = record.main_array(output)
            if isinstance(array, torch.Tensor):
                recorder.record(name_of(), array.detach().cpu().numpy())
        return run

    def unet_input(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        i = counter.i  # as refldm.pipelines.sampling records a step's model input
        record.value(f"steps.{i}.timestep", np.asarray(t.detach().cpu().numpy(), dtype=np.float64))
        record.value(f"steps.{i}.model_input", sample.detach().cpu().numpy())

    handles.append(pipe.unet.register_forward_pre_hook(unet_input, with_kwargs=True))
    handles.append(pipe.unet.register_forward_hook(hook(lambda: f"steps.{counter.i}.noise_pred")))
    for layer, module in pipe.unet.named_modules():
        if layer in unet_layers:
            handles.append(module.register_forward_hook(
                hook(lambda layer=layer: f"steps.{counter.i}.unet" + (f".{layer}" if layer else ""))))
    for part in ("text_encoder", "vae"):  # their layers, under the part's scope
        layers = {n[len(part) + 1:] for n in wanted if n.startswith(part + ".")} | ({""} if part in wanted else set())
        for layer, module in getattr(pipe, part).named_modules():
            if layer in layers:
                full = f"{part}.{layer}" if layer else part
                handles.append(module.register_forward_hook(hook(lambda full=full: full)))

    noise = np.asarray(reference.inputs["noise"])
    generator = torch.Generator().manual_seed(int(meta.get("seed", 0)))
    torch.randn(tuple(noise.shape), generator=generator)  # advance the stream past the noise, as refldm did
    try:
        with recorder, float64_timestep_embedding(float64_timestep and dtype == "float64"), torch.no_grad():
            pipe(meta.get("prompt", ""), negative_prompt=meta.get("negative_prompt") or None,
                 height=int(meta["height"]), width=int(meta["width"]), num_inference_steps=int(meta["steps"]),
                 guidance_scale=float(meta["guidance_scale"]), generator=generator,
                 latents=torch.from_numpy(noise).to(dt), output_type="np")
    finally:
        for h in handles:
            h.remove()
    out_meta = {k: v for k, v in meta.items() if k not in ("format", "order", "inputs", "backend")}
    out_meta["producer"] = f"diffusers {diffusers.__version__}, torch {torch.__version__}"
    return rtrace.Trace(recorder.activations, reference.inputs, out_meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("refldm_trace", help="a trace file written by `refldm trace` (gives part, dtype, inputs)")
    p.add_argument("model_folder", help="the diffusers model folder (or pipeline folder) it was traced from")
    p.add_argument("-o", "--output", help="where to write the diffusers trace (.safetensors)")
    p.add_argument("--rtol", type=float, help="tolerance on max|a-b|/max|b| (default by dtype: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RTOL.items()) + ")")
    p.add_argument("--all-modules", action="store_true",
                   help="record every module that holds weights, not only the names in the refldm trace")
    p.add_argument("--keep-float32-timestep", action="store_true",
                   help="leave diffusers' float32 timestep embedding as it is in float64 runs")
    p.add_argument("--summary", action="store_true", help="print only the summary, not every layer")
    args = p.parse_args(argv)

    reference = rtrace.load(args.refldm_trace)
    dtype = reference.metadata.get("dtype", "float32")
    if reference.metadata.get("part") == "pipeline":
        ours = trace_pipeline_like(reference, args.model_folder, float64_timestep=not args.keep_float32_timestep)
    else:
        model = load_model(args.model_folder, reference.metadata.get("part"), dtype)
        names = module_names(model) if args.all_modules else None
        ours = trace_like(reference, model=model, names=names, float64_timestep=not args.keep_float32_timestep)
    if args.output:
        rtrace.save_trace(args.output, ours)
    result = compare(reference, ours, rtol=args.rtol if args.rtol is not None else DEFAULT_RTOL.get(dtype, 1e-4))
    result.name_a, result.name_b = args.refldm_trace, args.output or "diffusers"
    print(result.summary() if args.summary else result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
