"""What a model holds, read from its files without loading a weight: `refldm info`'s description.

A diffusers folder: model_index.json names each part's class; per network (unet, vae, text_encoder,
text_encoder_2; for SD3 transformer, vae, text_encoder, text_encoder_2, text_encoder_3 (T5)) its config.json,
and from the safetensors headers alone its parameter count (what the file stores, buffers such as SD3's
position table included) and stored dtypes; per tokenizer the vocabulary size; the scheduler's config. An SDXL
refiner lists only the second text encoder and tokenizer ([null, null] for the first). A single
``.safetensors`` file (original CompVis / SDXL key names, refldm/checkpoints/convert.py): counts and dtypes
per network (SD 1.x / 2.x, SDXL, SD3 / SD3.5), and for SD 1.x / 2.x the configs read off the tensor shapes.
"""

from __future__ import annotations

import json
import os

from refldm.about import DEFAULT_MODEL
from refldm.checkpoints import convert
from refldm.checkpoints.weights import find_weights, read_config, read_header, refuse_pickle

__all__ = ["describe_model"]


def describe_model(model=None) -> dict:
    """{part: {"config": ..., "parameters": n, "dtypes": [...]}} of a folder or single file, without loading it."""
    if model is None:
        model = DEFAULT_MODEL
    refuse_pickle(model)
    out = {}
    if os.path.isdir(model):
        index = read_config(model, "model_index.json")
        sd3 = (index.get("transformer") or [None])[-1] == "SD3Transformer2DModel"
        flux = (index.get("transformer") or [None])[-1] == "FluxTransformer2DModel"  # CLIP-L + T5-XXL, no third
        parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3") if sd3 else \
            ("transformer", "vae", "text_encoder", "text_encoder_2") if flux else \
            ("unet", "vae", "text_encoder", "text_encoder_2") if "text_encoder_2" in index else \
            ("unet", "vae", "text_encoder")
        for part in parts:
            if part == "text_encoder" and "text_encoder_2" in index and (index.get(part) or [None])[-1] is None:
                continue  # an SDXL refiner has the second text encoder only
            if part == "text_encoder_3" and (index.get(part) or [None])[-1] is None:
                out[part] = {"class": None, "note": "left out (no T5): zeros stand in for its states"}
                continue
            folder = os.path.join(model, part)
            if not os.path.isdir(folder):
                raise OSError(f"{model}: the model folder has no {part}/")
            stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
            count, dtypes = 0, set()
            for path in find_weights(folder, stem):
                header, _, _ = read_header(path)
                for info in header.values():
                    count += _numel(info["shape"])
                    dtypes.add(info["dtype"])
            out[part] = {"class": (index.get(part) or [None, None])[-1], "parameters": count,
                         "dtypes": sorted(dtypes), "config": read_config(folder)}
        for name in ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if sd3 else ()):
            if (index.get(name) or [None])[-1] is None and (name == "tokenizer_2" or "text_encoder_2" in index):
                continue  # not an SDXL folder, or an SDXL refiner (no first tokenizer)
            tok = os.path.join(model, name)
            vocab, fast = os.path.join(tok, "vocab.json"), os.path.join(tok, "tokenizer.json")
            n_vocab = None
            if os.path.isfile(fast):  # transformers 5's one file: the vocabulary is its model's (BPE or unigram)
                with open(fast, encoding="utf-8") as f:
                    n_vocab = len((json.load(f).get("model") or {}).get("vocab") or {})
            elif os.path.isfile(vocab):
                with open(vocab, encoding="utf-8") as f:
                    n_vocab = len(json.load(f))
            out[name] = {"class": (index.get(name) or [None, None])[-1], "vocabulary": n_vocab}
        out["scheduler"] = {"class": (index.get("scheduler") or [None, None])[-1],
                            "config": read_config(os.path.join(model, "scheduler"), "scheduler_config.json")}
        return out
    if not os.path.isfile(model):
        raise OSError(f"{model}: no such model folder or file")
    header, metadata, _ = read_header(model)
    if convert.is_sd3(header):  # counts and dtypes per network; the configs come with --config SD3_FOLDER
        classes = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                   "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                   "text_encoder_3": "T5EncoderModel"}
        for part, pre in convert.SD3_PREFIXES.items():
            infos = [v for k, v in header.items() if k.startswith(pre)]
            if infos:
                out[part] = {"class": classes[part], "parameters": sum(_numel(i["shape"]) for i in infos),
                             "dtypes": sorted({i["dtype"] for i in infos}),
                             "config": {"_layout": "SD3 single file"}}
            elif part.startswith("text_encoder"):
                out[part] = {"class": None, "note": f"not in the file (no {pre}*)"}
        return out
    if convert.is_flux(header):  # the reference repository's FLUX.1 transformer file (the rest: --config FOLDER)
        infos = list(header.values())
        try:
            config = dict(convert.flux_config_from_shapes({k: _Shaped(v["shape"]) for k, v in header.items()}),
                          _inferred_from_shapes="FLUX single file")
        except (ValueError, KeyError):
            config = {"_layout": "FLUX single file"}
        out["transformer"] = {"class": "FluxTransformer2DModel", "parameters": sum(_numel(i["shape"]) for i in infos),
                              "dtypes": sorted({i["dtype"] for i in infos}), "config": config}
        return out
    kind = convert.detect(header)
    if kind == "sdxl":  # counts and dtypes per network; SDXL configs are not read off the shapes
        for part, pre, cls in (("unet", convert.UNET_PREFIX, "UNet2DConditionModel"),
                               ("vae", convert.VAE_PREFIX, "AutoencoderKL"),
                               ("text_encoder", convert.XL_CLIP_PREFIX, "CLIPTextModel"),
                               ("text_encoder_2", convert.XL_OPEN_CLIP_PREFIX, "CLIPTextModelWithProjection")):
            infos = [v for k, v in header.items() if k.startswith(pre)]
            out[part] = {"class": cls, "parameters": sum(_numel(i["shape"]) for i in infos),
                         "dtypes": sorted({i["dtype"] for i in infos}), "config": {"_layout": "SDXL single file"}}
        return out
    prefixes = {"unet": (convert.UNET_PREFIX,), "vae": (convert.VAE_PREFIX,),
                "text_encoder": (convert.CLIP_PREFIX if kind == "sd1" else convert.OPEN_CLIP_PREFIX,)}

    class _Shape:  # infer_configs only reads .shape
        def __init__(self, shape):
            self.shape = tuple(shape)

    configs = convert.infer_configs({k: _Shape(v["shape"]) for k, v in header.items()}, kind)
    for part, pre in prefixes.items():
        infos = [v for k, v in header.items() if k.startswith(pre)]
        out[part] = {"class": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                               "text_encoder": "CLIPTextModel"}[part],
                     "parameters": sum(_numel(i["shape"]) for i in infos),
                     "dtypes": sorted({i["dtype"] for i in infos}),
                     "config": dict(configs[part], _inferred_from_shapes=f"{kind.upper()} single file")}
    other = [k for k in header if not k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                    "cond_stage_model."))]
    if other:
        out["other tensors"] = {"count": len(other), "examples": sorted(other)[:5]}
    return out


class _Shaped:
    """A header entry standing in for its tensor where only .shape is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
