"""One cell of a grid, run where it is sent (this process, a local worker process, a Dask worker).

`run_cell(task)` is the only function an executor calls; it never raises for a failing cell (a bad LoRA, a
model that does not load, out of memory): it returns the cell's record with status "failed" and the error's
first line, and the grid goes on. An "ok" record carries the PNG's bytes, encoded where the cell ran, so the
bytes are the same whichever machine wrote them; the caller writes them (atomically) where the grid lives.

Each process keeps the pipelines it loaded (`CACHE_SIZE`, least recently used out first), keyed by the
loader, the model, the dtype and img2img or not: cells that share a model (the grid runs them together) load
it once per process. A LoRA is merged for its cell and removed after it, so a cached model stays clean.

May import: as the grid package (refldm/grid/__init__.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections import OrderedDict

__all__ = ["run_cell", "render", "default_loader", "png_bytes", "read_cell_key", "clear_cache", "KEY_CHUNK"]

KEY_CHUNK = "refldm-grid"  # the PNG text chunk holding the cell's settings (canonical JSON), for --resume
CACHE_SIZE = 2
_CACHE: OrderedDict = OrderedDict()


def default_loader(model, dtype="float32", img2img=False):
    """The pipeline for `model`: None -> the built-in model; a diffusers SD / SDXL / SD3 folder; an SD 1.x / 2.x
    single .safetensors file (the CLI passes its own loader, which takes --config / --tokenizer too)."""
    if model is None:
        from refldm.about import DEFAULT_MODEL
        from refldm.pipelines.sd import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype)
        pipe.name = "refldm-default"
        return pipe
    if os.path.isdir(model):
        from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline, is_sd3_folder
        from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, is_sdxl_folder
        if is_sd3_folder(model):
            return (StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline).from_pretrained(
                model, dtype=dtype)
        if is_sdxl_folder(model):
            return (StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline).from_pretrained(
                model, dtype=dtype)
    from refldm.pipelines.sd import StableDiffusionPipeline
    if os.path.isdir(model):
        return StableDiffusionPipeline.from_pretrained(model, dtype=dtype)
    return StableDiffusionPipeline.from_single_file(model, dtype=dtype)


def _loader_id(loader) -> str:
    func = getattr(loader, "func", loader)
    keywords = sorted(getattr(loader, "keywords", {}).items())
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}{keywords}"


def pipeline_for(settings: dict, loader=None):
    """The cached pipeline of a cell's model (loaded on first use in this process)."""
    loader = loader or default_loader
    img2img = settings["image"] is not None
    key = (_loader_id(loader), settings["checkpoint"], settings["dtype"], img2img)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    while len(_CACHE) >= CACHE_SIZE:
        _CACHE.popitem(last=False)
    pipe = loader(settings["checkpoint"], dtype=settings["dtype"], img2img=img2img)
    _CACHE[key] = pipe
    return pipe


def clear_cache() -> None:
    _CACHE.clear()


def _call_kwargs(settings: dict) -> dict:
    kwargs = dict(settings.get("extra") or {})
    kwargs.update(negative_prompt=settings["negative"], num_inference_steps=settings["steps"],
                  guidance_scale=settings["cfg"], seed=settings["seed"], sampler=settings["sampler"],
                  progress=False)
    if settings["clip_skip"]:
        kwargs["clip_skip"] = settings["clip_skip"]
    if settings["rng"] is not None:
        kwargs["rng"] = settings["rng"]
    if settings["image"] is not None:
        from refldm.core.images import load_image
        kwargs["image"] = load_image(settings["image"])
        kwargs["strength"] = 0.75 if settings["denoise"] is None else settings["denoise"]
    else:
        kwargs.update(height=settings["height"], width=settings["width"])
        if settings["hires_scale"] is not None:
            kwargs["hires_scale"] = settings["hires_scale"]
            if settings["denoise"] is not None:
                kwargs["hires_denoise"] = settings["denoise"]
    return kwargs


def render(settings: dict, key: str, loader=None, accel_switch=None) -> tuple:
    """(PNG bytes, parameters text) of one cell. `accel_switch(on)`, a context manager (refldm.accel.enabled,
    which the CLI passes: the grid layer does not import the speed layer), applies the cell's accel setting."""
    accel = settings["accel"]
    if accel is not None and accel_switch is None:
        raise ValueError("the accel setting needs accel_switch (refldm.accel.enabled; the CLI passes it)")
    switch = contextlib.nullcontext() if accel is None else accel_switch(accel == "speed")
    with switch:
        pipe = pipeline_for(settings, loader)
        lora = settings["lora"] if settings["lora"] and settings["lora_scale"] != 0 else None
        if lora is not None:
            from refldm.adapters.lora import apply_loras
            apply_loras(pipe, [(lora, settings["lora_scale"])], merge=True)
        try:
            out = pipe(settings["prompt"], **_call_kwargs(settings))
        finally:
            if lora is not None:
                from refldm.adapters.lora import remove_loras
                remove_loras(pipe)
    extra = {}
    if settings["dtype"] != "float32":
        extra["Dtype"] = settings["dtype"]
    if accel == "reference":  # the speed layer is the default
        extra["Ops"] = accel
    if lora is not None:
        extra["LoRA"] = f"{os.path.basename(lora)}:{settings['lora_scale']:g}"
    made = out.generation[0]
    if extra:
        made = made.replace(extra={**made.extra, **extra})
    text = made.text()
    return png_bytes(out.images[0], text, key), text


def png_bytes(image, parameters: str | None, key: str | None) -> bytes:
    """The PNG file of a cell: the image, its ``parameters`` text (as the web UIs write it) and its settings."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if key is not None:
        info.add_text(KEY_CHUNK, key)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_cell_key(path) -> str | None:
    """The settings a grid cell's PNG carries (None: a PNG without them, or not a PNG refldm can read)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.text.get(KEY_CHUNK) if hasattr(im, "text") else None
    except (OSError, ValueError, SyntaxError):
        return None


def run_cell(task: dict) -> dict:
    """Run one cell; its record: index, status ("ok" | "failed"), error, png (bytes), parameters, seconds, where."""
    start = time.perf_counter()
    png = text = error = None
    try:
        png, text = render(task["settings"], task["key"], task.get("loader"), task.get("accel_switch"))
        status = "ok"
    except Exception as e:  # a failing cell is recorded, the grid goes on (KeyboardInterrupt still stops it)
        message = str(e).strip().splitlines()
        status, error = "failed", f"{type(e).__name__}: {message[0] if message else ''}".rstrip(": ")
    return {"index": task["index"], "status": status, "error": error, "png": png, "parameters": text,
            "seconds": round(time.perf_counter() - start, 4), "where": f"{socket.gethostname()}:{os.getpid()}"}
