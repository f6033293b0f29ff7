"""Where each word lands: the U-Net's cross-attention probabilities per prompt token, from a recording.

In every cross-attention layer (``attn2``) a pixel's query meets the text's keys:

    P_h = softmax(Q_h K_h^T / sqrt(d))      (B, L, S) per head h;  L = h*w pixels, S = 77 text tokens

so P_h[b, p, s] is how much of pixel p's update comes from token s. Averaging P over the H heads and over
the layers that work at one resolution, and reshaping the L pixels to (h, w), gives one map per token and
resolution (Hertz et al. 2022, "Prompt-to-Prompt", sec. 3.1, show such maps). Nothing in the model changes:
the recording hook (`refldm.core.record`) keeps the outputs of each ``attn2.to_q`` and ``attn2.to_k`` layer,
and P is computed again here from them with refldm's own ops.

    maps = attention_maps(pipe, "a red circle", num_inference_steps=10, seed=1)
    maps.tokens               ["a", "red", "circle"]          the prompt's tokens (between BOS and EOS)
    maps.maps[(8, 8)]         (steps, B, 77, 8, 8)            per step, image, token slot, pixel
    maps.token_map(2)         (h, w) for token 2 ("red": slot 0 is BOS), averaged over steps, at the finest size
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy

from refldm.core import ops, record

__all__ = ["AttentionMaps", "ATTENTION_PATTERNS", "from_recording", "attention_maps", "prompt_tokens", "prompt_ids",
           "map_tokenizer"]

# what a recording must keep for the maps: the queries and keys of every cross-attention layer
ATTENTION_PATTERNS = ("steps.*.unet.*attn2.to_q", "steps.*.unet.*attn2.to_k")

_NAME = re.compile(r"^steps\.(\d+)\.unet\.(.*attn2)\.to_([qk])(?:#(\d+))?$")


@dataclasses.dataclass
class AttentionMaps:
    """maps: {(h, w): (steps, B, S, h, w)} mean probabilities; tokens: the prompt's token strings (slots 1..n);
    layers: {(h, w): the attn2 layer names averaged there}."""

    maps: dict
    tokens: list
    layers: dict

    @property
    def resolutions(self) -> list:
        """The (h, w) sizes, finest first."""
        return sorted(self.maps, key=lambda hw: -hw[0] * hw[1])

    def token_map(self, slot: int, resolution=None, step=None, image: int = 0):
        """The (h, w) map of token slot `slot` (1 = the first word; 0 is BOS), at `resolution` (default the
        finest), at step `step` (default: the mean over the steps)."""
        hw = self.resolutions[0] if resolution is None else tuple(resolution)
        m = self.maps[hw][:, image, slot]
        return m.mean(axis=0) if step is None else m[step]


def _module(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def from_recording(activations: dict, unet, latent_hw, conditional: slice | None = None) -> dict:
    """{(h, w): (steps, B, S, h, w)} from a recording's ``steps.<i>.unet.<...>.attn2.to_q`` / ``to_k`` values.

    latent_hw: the latents' (h, w); conditional: the part of the U-Net batch to keep (under classifier-free
    guidance the second half, ``slice(B, 2B)``: the first half attends to the negative prompt). Returns
    (maps, layers)."""
    found = {}
    for name, value in activations.items():
        m = _NAME.match(name)
        if m:
            step, layer, which = int(m.group(1)), m.group(2), m.group(3)
            found.setdefault((step, layer), {})[which] = value
    if not found:
        raise ValueError("the recording holds no cross-attention queries and keys (record ATTENTION_PATTERNS)")
    h0, w0 = (int(v) for v in latent_hw)
    sums, counts, layers = {}, {}, {}
    for (step, layer), qk in sorted(found.items()):
        heads = _module(unet, layer).heads
        q, k = (numpy.asarray(qk[x], numpy.float64) for x in ("q", "k"))  # (B2, L, H*d), (B2, S, H*d)
        if conditional is not None:
            q, k = q[conditional], k[conditional]
        qh, kh = ops.split_heads(q, heads), ops.split_heads(k, heads)      # (B, H, L, d), (B, H, S, d)
        d = qh.shape[-1]
        p = ops.softmax(qh @ numpy.swapaxes(kh, -1, -2) / math.sqrt(d), axis=-1)  # (B, H, L, S)
        p = p.mean(axis=1)                                                  # over the heads: (B, L, S)
        s = round(math.sqrt(h0 * w0 / p.shape[1]))                          # the layer's downsampling factor
        hw = (-(-h0 // s), -(-w0 // s))
        if hw[0] * hw[1] != p.shape[1]:
            raise ValueError(f"{layer}: {p.shape[1]} pixels do not fit the latents' {h0}x{w0} grid")
        grid = numpy.swapaxes(p, 1, 2).reshape(p.shape[0], p.shape[2], *hw)  # (B, S, h, w)
        key = (hw, step)
        sums[key] = sums.get(key, 0) + grid
        counts[key] = counts.get(key, 0) + 1
        layers.setdefault(hw, [])
        if layer not in layers[hw]:
            layers[hw].append(layer)
    maps = {}
    for hw in layers:
        steps = sorted(step for (r, step) in sums if r == hw)
        maps[hw] = numpy.stack([sums[(hw, i)] / counts[(hw, i)] for i in steps])  # (steps, B, S, h, w)
    return maps, layers


def map_tokenizer(pipe):
    """The tokenizer whose tokens the maps are over: ``pipe.tokenizer`` (SDXL: the first of its two, CLIP ViT-L's;
    the context is [enc1(prompt), enc2(prompt)] along the features, one row per token position, and both
    CLIP tokenizers split a prompt alike), or ``tokenizer_2`` for an SDXL refiner, which has that one alone."""
    tok = getattr(pipe, "tokenizer", None)
    return tok if tok is not None else getattr(pipe, "tokenizer_2", None)


def prompt_ids(pipe, prompt: str) -> list:
    """The prompt's token ids as the map tokenizer gives them: [BOS] + ids + [EOS] + padding."""
    tok = map_tokenizer(pipe)
    if tok is None:
        raise ValueError(f"{getattr(pipe, 'name', 'the model')}: has no tokenizer, so its tokens cannot be named")
    if hasattr(pipe, "tokenize") and tok is getattr(pipe, "tokenizer", None):
        return [int(i) for i in pipe.tokenize([prompt])[0]]
    return [int(i) for i in tok([prompt], padding="max_length", truncation=True, return_tensors="np")["input_ids"][0]]


def prompt_tokens(pipe, prompt: str) -> list:
    """The prompt's token strings as the text encoder sees them, without BOS, EOS and padding ("red", ...)."""
    tok = map_tokenizer(pipe)
    ids = prompt_ids(pipe, prompt)
    end = getattr(tok, "eos_token_id", ids[-1])                   # (a tokenizer padding with "!" ends in "!")
    eos = ids.index(end, 1) if end in ids[1:] else len(ids)
    words = tok.convert_ids_to_tokens(ids[1:eos])
    return [w.replace("</w>", "") for w in words]


def attention_maps(pipe, prompt: str, **call_kwargs) -> AttentionMaps:
    """Run `pipe(prompt, **call_kwargs)` with the queries and keys of its cross-attention layers recorded and
    return the maps of the conditional half (`from_recording`). The output is in ``maps.output``."""
    with record.Recorder(include=ATTENTION_PATTERNS) as rec:
        out = pipe(prompt, **call_kwargs)
    latents = out.latents
    b = latents.shape[0]
    guided = float(call_kwargs.get("guidance_scale", 7.5)) > 1.0
    maps, layers = from_recording(rec.activations, pipe.unet, latents.shape[2:],
                                  slice(b, 2 * b) if guided else None)
    result = AttentionMaps(maps, prompt_tokens(pipe, prompt), layers)
    result.output = out
    return result
