"""Loading IP-Adapter files into a U-Net, and the image features they need (the math: refldm/models/ip_adapter.py).

An IP-Adapter file (``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sd15.safetensors``,
``ip-adapter_sdxl.safetensors``, ...) holds two groups of keys, the layout of tencent-ailab's release:

    image_proj.proj.{weight,bias}, image_proj.norm.{weight,bias}          the plain projection (4 tokens)
    image_proj.latents, image_proj.proj_in.*, image_proj.proj_out.*,     the "plus" resampler
        image_proj.norm_out.*, image_proj.layers.i.0.*, image_proj.layers.i.1.*
    ip_adapter.{2k+1}.to_k_ip.weight, ip_adapter.{2k+1}.to_v_ip.weight    the k-th cross-attention (attn2)

The cross-attentions are numbered as diffusers' ``unet.attn_processors`` lists them, counting the
self-attentions too (hence the odd numbers): the down blocks, then the up blocks, then the mid block, each
transformer block's attn1 then attn2. `cross_attentions` walks refldm's U-Net in that order.

    adapter = load_ip_adapter_file("ip-adapter_sd15.safetensors")     # checked, nothing changed yet
    apply_ip_adapters(unet, [adapter])                                 # attn2.processor, unet.encoder_hid_proj
    set_ip_adapter_scale(unet, 0.6)
    remove_ip_adapters(unet)                                           # the plain U-Net again

Only .safetensors files are read (a pickle .bin is refused, never opened). The FaceID and "full face" layouts
are recognised and refused by name; any other layout is refused naming the keys that do not fit.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from refldm import backend
from refldm.checkpoints.weights import WeightsError, load_file, load_into, refuse_pickle, shown
from refldm.models.ip_adapter import (IPAdapterAttnProcessor, IPAdapterPlusImageProjection, ImageProjection,
                                      MultiIPAdapterImageProjection, PLUS_HEAD_DIM)

__all__ = ["IPAdapter", "IPAdapterError", "load_ip_adapter_file", "apply_ip_adapters", "remove_ip_adapters",
           "set_ip_adapter_scale", "cross_attentions", "check_scale", "encode_image"]

PLAIN_TOKENS = 4  # the plain adapter's token count: not stored in the file (diffusers assumes 4 as well)


class IPAdapterError(WeightsError):
    """An IP-Adapter file that does not fit: unknown layout, another U-Net, a pickle."""


@dataclass
class IPAdapter:
    """A parsed IP-Adapter file: its image projection (built and loaded) and its per-attn2 key/value weights.

    kind: "plain" (reads the image encoder's image_embeds) or "plus" (reads hidden_states[-2]);
    attention: {k: (to_k_ip (inner_k, C), to_v_ip (inner_k, C))} for the k-th cross-attention."""

    path: str
    kind: str
    image_proj: object
    attention: dict
    cross_attention_dim: int

    @property
    def uses_hidden_states(self) -> bool:
        return self.kind == "plus"


# -- the file ---------------------------------------------------------------------------------------------------

_REFUSED = (  # (a key that marks it, the layout's name): known layouts refldm does not implement
    ("proj.3.weight", "IP-Adapter Full Face (MLP projection)"),
    ("perceiver_resampler.proj_in.weight", "IP-Adapter FaceID Plus"),
)
_PLAIN = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
_PLUS_KEY = re.compile(r"(latents|(proj_in|proj_out|norm_out)\.(weight|bias)|layers\.\d+\.[01]\.\S+)$")


def load_ip_adapter_file(path, dtype="float32") -> IPAdapter:
    """Read and check an IP-Adapter .safetensors file; the projection is built and loaded in `dtype`."""
    path = os.fspath(path)
    refuse_pickle(path)
    if not path.endswith(".safetensors"):
        raise IPAdapterError(f"{path}: not a .safetensors file; refldm reads IP-Adapter weights from .safetensors "
                             "only (never a pickle .bin)")
    state = load_file(path)
    proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    attn = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
    other = sorted(k for k in state if not k.startswith(("image_proj.", "ip_adapter.")))
    if other:
        raise IPAdapterError(f"{path}: not an IP-Adapter file of a known layout: keys {_list(other)} are neither "
                             "image_proj.* nor ip_adapter.*")
    if not proj or not attn:
        raise IPAdapterError(f"{path}: an IP-Adapter file needs image_proj.* and ip_adapter.* keys; it has "
                             f"{'no image_proj.*' if not proj else 'no ip_adapter.*'}")
    kind, image_proj = _image_projection(proj, path)
    load_into(image_proj, proj, dtype=dtype, source=f"{path} (image_proj)")
    attention = _attention_weights(attn, path)
    widths = {a.shape[1] for pair in attention.values() for a in pair}
    out_dim = image_proj.norm.weight.shape[0] if kind == "plain" else image_proj.norm_out.weight.shape[0]
    if widths != {out_dim}:
        raise IPAdapterError(f"{path}: the image tokens are {out_dim} wide but to_k_ip / to_v_ip read "
                             f"{sorted(widths)}-wide input")
    return IPAdapter(path, kind, image_proj, attention, out_dim)


def _list(keys) -> str:
    keys = [shown(k) for k in keys]
    return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def _image_projection(proj: dict, path: str):
    """(kind, the projection module with the file's key names) from the image_proj.* keys' names and shapes."""
    for marker, name in _REFUSED:
        if marker in proj:
            raise IPAdapterError(f"{path}: an {name} file (image_proj.{marker}); refldm implements the plain and "
                                 "the plus IP-Adapters only")
    if "proj.weight" in proj:
        extra = sorted(set(proj) - _PLAIN)
        if extra:
            keys = ", ".join("image_proj." + k for k in extra[:6])
            raise IPAdapterError(f"{path}: unknown image_proj layout: keys {keys} do not fit the plain IP-Adapter "
                                 "(proj, norm)")
        rows, embed_dim = proj["proj.weight"].shape
        if rows % PLAIN_TOKENS:
            raise IPAdapterError(f"{path}: image_proj.proj.weight has {rows} rows, not {PLAIN_TOKENS} tokens' worth")
        return "plain", ImageProjection(embed_dim, rows // PLAIN_TOKENS, PLAIN_TOKENS)
    if "norm.weight" in proj:
        raise IPAdapterError(f"{path}: an IP-Adapter FaceID file (image_proj.norm without image_proj.proj); refldm "
                             "implements the plain and the plus IP-Adapters only")
    misfits = sorted(k for k in proj if not _PLUS_KEY.match(k))
    needed = [k for k in ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight") if k not in proj]
    if misfits or needed:
        what = f"keys image_proj.{', image_proj.'.join(misfits[:6])} fit neither the plain (proj, norm) nor the " \
               "plus (latents, proj_in, proj_out, norm_out, layers) layout" if misfits else \
               f"the plus layout lacks image_proj.{', image_proj.'.join(needed)}"
        raise IPAdapterError(f"{path}: unknown image_proj layout: {what}")
    _, queries, hidden = proj["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in proj if k.startswith("layers."))
    inner = proj["layers.0.0.to_q.weight"].shape[0]
    if inner % PLUS_HEAD_DIM:
        raise IPAdapterError(f"{path}: image_proj.layers.0.0.to_q.weight has {inner} rows, not a multiple of the "
                             f"resampler's head size {PLUS_HEAD_DIM}")
    ff = proj.get("layers.0.1.1.weight")
    ratio = ff.shape[0] // hidden if ff is not None else 4
    module = IPAdapterPlusImageProjection(embed_dims=proj["proj_in.weight"].shape[1],
                                          output_dims=proj["proj_out.weight"].shape[0], hidden_dims=hidden,
                                          depth=depth, heads=inner // PLUS_HEAD_DIM, num_queries=queries,
                                          ffn_ratio=ratio)
    return "plus", module


def _attention_weights(attn: dict, path: str) -> dict:
    """{k: (to_k_ip, to_v_ip)} from ip_adapter.{2k+1}.to_{k,v}_ip.weight; anything else is named."""
    pairs, misfits = {}, []
    for key, value in attn.items():
        m = re.fullmatch(r"(\d+)\.to_([kv])_ip\.weight", key)
        if not m or int(m.group(1)) % 2 == 0 or value.ndim != 2:
            misfits.append("ip_adapter." + key)
            continue
        pairs.setdefault((int(m.group(1)) - 1) // 2, {})[m.group(2)] = value
    if misfits:
        raise IPAdapterError(f"{path}: unknown ip_adapter layout: keys {_list(sorted(misfits))} are not "
                             "ip_adapter.<odd number>.to_k_ip.weight / to_v_ip.weight")
    n = len(pairs)
    holes = [2 * k + 1 for k in range(n) if set(pairs.get(k, {})) != {"k", "v"}]
    if holes:
        raise IPAdapterError(f"{path}: ip_adapter.{holes[0]}.to_k_ip / to_v_ip is missing (the file must number "
                             f"its {n} cross-attentions 1, 3, ..., {2 * n - 1}, each with to_k_ip and to_v_ip)")
    return {k: (p["k"], p["v"]) for k, p in sorted(pairs.items())}


# -- the U-Net --------------------------------------------------------------------------------------------------

def cross_attentions(unet) -> list:
    """The U-Net's attn2 modules in diffusers' attn_processors order: down blocks, up blocks, mid block."""
    out = []
    for block in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]:
        for transformer in getattr(block, "attentions", ()):
            for layer in transformer.transformer_blocks:
                out.append(layer.attn2)
    return out


def apply_ip_adapters(unet, adapters: list, dtype=None) -> None:
    """Attach the adapters to `unet`: a processor with their to_k_ip / to_v_ip on every attn2 (scale 1 each)
    and their projections as ``unet.encoder_hid_proj``; any earlier IP-Adapter is replaced. Everything is
    checked before the U-Net changes."""
    dtype = dtype or unet.dtype or "float32"
    attns = cross_attentions(unet)
    width = unet.config.cross_attention_dim[0]
    processors = []
    for a in adapters:
        if len(a.attention) != len(attns):
            raise IPAdapterError(f"{a.path}: the IP-Adapter has {len(a.attention)} cross-attentions (ip_adapter.1 .. "
                                 f"ip_adapter.{2 * len(a.attention) - 1}) but the U-Net has {len(attns)}; it was made "
                                 "for another model family (SD 1.x: 16, SDXL base: 70)")
        if a.cross_attention_dim != width:
            raise IPAdapterError(f"{a.path}: the IP-Adapter's image tokens are {a.cross_attention_dim} wide but the "
                                 f"U-Net's cross-attention is {width} wide (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)")
    for k, attn in enumerate(attns):
        inner, context_dim = attn.to_k.weight.shape
        proc = IPAdapterAttnProcessor(inner, context_dim, attn.heads, count=len(adapters))
        state = {}
        for i, a in enumerate(adapters):
            state[f"to_k_ip.{i}.weight"], state[f"to_v_ip.{i}.weight"] = a.attention[k]
        names = ", ".join(os.path.basename(a.path) for a in adapters)
        load_into(proc, state, dtype=dtype, source=f"{names} (ip_adapter.{2 * k + 1}, for {attn._name})")
        processors.append(proc)
    remove_ip_adapters(unet)
    for attn, proc in zip(attns, processors):
        attn.processor = proc
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([a.image_proj for a in adapters])
    unet.assign_names()


def remove_ip_adapters(unet) -> None:
    """The plain U-Net again: every processor and the projections removed (the attention as before, bit for bit)."""
    for attn in cross_attentions(unet):
        vars(attn).pop("processor", None)
    vars(unet).pop("encoder_hid_proj", None)
    unet.assign_names()


def check_scale(scale, name: str = "ip_adapter_scale") -> float:
    """A finite number >= 0 (0 turns the adapter off); one clear line otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{name}={scale!r} must be a number (per-block scale dicts are not implemented)")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name}={scale!r} must be a finite number >= 0 (0 turns the IP-Adapter off)")
    return scale


def set_ip_adapter_scale(unet, scale) -> None:
    """One scale for every adapter, or a list of one per adapter (diffusers' set_ip_adapter_scale, numbers only)."""
    attns = [a for a in cross_attentions(unet) if a.processor is not None]
    if not attns:
        raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded")
    count = len(attns[0].processor.scale)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
    if len(scales) != count:
        raise ValueError(f"set_ip_adapter_scale: {len(scales)} scales for {count} IP-Adapters")
    scales = [check_scale(s, "set_ip_adapter_scale: scale") for s in scales]
    for attn in attns:
        attn.processor.scale = list(scales)


# -- the image features -----------------------------------------------------------------------------------------

def encode_image(image_encoder, processor, images, uses_hidden_states: bool):
    """diffusers' ``encode_image`` for one adapter: -> (features, negative features), each (n, E) (plain:
    image_embeds; the negative is zeros) or (n, 1+N, E) (plus: hidden_states[-2]; the negative is the encoding
    of an all-zero pixel_values). `images`: a PIL image or a list of them (n images)."""
    pixels = processor(images)["pixel_values"]                                  # (n, 3, S, S) float32
    xp = backend.array_namespace(image_encoder.visual_projection.weight)
    if uses_hidden_states:
        cond = image_encoder(pixels, output_hidden_states=True).hidden_states[-2]      # (n, 1+N, E)
        uncond = image_encoder(np.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return cond, uncond
    cond = image_encoder(pixels).image_embeds                                   # (n, E)
    return cond, xp.zeros_like(cond)
