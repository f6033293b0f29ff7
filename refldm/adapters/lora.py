"""LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for the U-Net and
the text encoder, read from the two file formats people download, applied merged or on the fly.

A LoRA replaces a layer's weight W (out, in) by W + s * (alpha / r) * B A, where A = lora_down (r, in),
B = lora_up (out, r), r the rank, alpha a number stored with the file, s the user's scale:

    linear:          y = x W^T + b  +  s * (alpha / r) * (x A^T) B^T             x (..., in) -> (..., out)
    conv (LoCon):    y = conv(x, W) + b  +  s * (alpha / r) * conv1x1(conv(x, A), B)
                     A (r, in, k, k) with the layer's kernel k, stride and padding; B (out, r, 1, 1);
                     merged: W + s (alpha / r) * einsum("or,rikl->oikl", B, A)

Merged (`apply_loras(..., merge=True)`) adds the product to the weight once (as diffusers' ``fuse_lora``);
on the fly (merge=False) keeps W and adds the low-rank branch in the forward pass (as diffusers'
``set_adapters``). `remove_loras` restores every adapted layer: merged weights go back to the very array
that was there before (kept aside, not recomputed by subtraction), so the restore is bit for bit.

File formats (safetensors only; .pt / .bin / .ckpt are refused unopened):
- kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (a scalar; absent means alpha = r), and ``lora_te_text_model_<module>`` (``lora_te1_`` the same) for the
  text encoder. ``lora_te2_`` targets SDXL's second text encoder, which refldm's pipeline has not.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.[text_model.]
  <module>...``, as diffusers' ``save_lora_weights`` writes them. alpha comes from the JSON in the header
  metadata ``lora_adapter_metadata`` (``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``
  where alpha / sqrt(r) replaces alpha / r); without it alpha = r, i.e. the factor is 1 (diffusers' rule).

docs/adapters.md has the math with shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from refldm import backend
from refldm.core import functional as F
from refldm.checkpoints.weights import WeightsError, read_header, load_file

__all__ = ["LoRA", "LoRALayer", "LoRAError", "load_lora", "apply_loras", "remove_loras", "adapted_layers"]

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# The largest |alpha| or |scale| accepted: far beyond any trained LoRA (alpha is at most a few hundred),
# and small enough that alpha * scale * B A cannot overflow float64 before the finiteness check.
MAX_ALPHA = 1e6
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the PEFT LoraConfig of each part, as JSON
# Keys of other adapter kinds, refused by name rather than reported as "matches no layer".
OTHER_KINDS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
               ".diff": "a full weight difference", "lora_mid.weight": "LoCon with a mid (Tucker) weight"}


class LoRAError(WeightsError):
    """A LoRA file that refldm cannot read or that does not fit the model."""


@dataclass
class LoRALayer:
    """One adapted layer: W (out, in[, k, k]) gains (alpha / rank) * up @ down.

    target: "unet" or "text_encoder"; key: the layer's module key in that model
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); down: A, (r, in) or (r, in, k, k);
    up: B, (out, r) or (out, r, 1, 1); alpha: the file's alpha (the factor is alpha / r, or alpha / sqrt(r)
    for rsLoRA).
    """

    target: str
    key: str
    down: np.ndarray
    up: np.ndarray
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / r (alpha / sqrt(r) for rsLoRA): the file's own scale of B A."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self) -> np.ndarray:
        """factor * B A in float64, shaped like the layer's weight: (out, in) or (out, in, k, k)."""
        down, up = self.down.astype(np.float64), self.up.astype(np.float64)
        if down.ndim == 2:
            return self.factor * (up @ down)                                           # (out, r) @ (r, in)
        return self.factor * np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)          # 1x1 up, k x k down


@dataclass
class LoRA:
    """A LoRA file, parsed: its layers, the format it came in, and its path."""

    path: str
    format: str          # "kohya" or "diffusers"
    layers: list

    @property
    def targets(self) -> set:
        return {layer.target for layer in self.layers}


# ----------------------------------------------------------------------------------------------------------
# Reading the two formats


def load_lora(path) -> LoRA:
    """Read a LoRA safetensors file (kohya / A1111 or diffusers / PEFT keys) into a `LoRA`."""
    path = os.fspath(path)
    if path.lower().endswith((".pt", ".bin", ".ckpt", ".pth", ".pkl")):
        read_header(path)  # raises the pickle refusal with its advice
    _, metadata, _ = read_header(path)
    state = load_file(path)
    if not state:
        raise LoRAError(f"{path}: holds no tensors")
    for key in state:
        for marker, kind in OTHER_KINDS.items():
            if marker in key:
                raise LoRAError(f"{path}: key {key!r} belongs to {kind}, which refldm does not implement "
                                "(only plain LoRA / LoCon: lora_down/lora_up or lora_A/lora_B)")
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in state):
        return LoRA(path, "kohya", _read_kohya(state, path))
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        return LoRA(path, "diffusers", _read_diffusers(state, metadata or {}, path))
    if any(k.endswith((".lora.down.weight", "_lora.down.weight")) for k in state):
        raise LoRAError(f"{path}: diffusers' old attention-processor LoRA format (...to_q_lora.down.weight) is "
                        "not implemented; re-save it with a current diffusers (save_lora_weights)")
    raise LoRAError(f"{path}: not a LoRA file: no key starts with lora_unet_ / lora_te_ or holds .lora_A. / "
                    f".lora_B. (first keys: {', '.join(sorted(state)[:3])})")


def _read_kohya(state: dict, path: str) -> list:
    """{lora_unet_x_y.lora_down.weight, .lora_up.weight, .alpha} -> LoRALayer per module name x_y."""
    groups = {}
    for key, value in state.items():
        name, dot, leaf = key.partition(".")
        prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None or leaf not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoRAError(f"{path}: key {key!r} is not a kohya LoRA key (lora_unet_* / lora_te_* with "
                            ".lora_down.weight, .lora_up.weight or .alpha)")
        groups.setdefault(name, {})[leaf] = value
    layers = []
    for name, parts in sorted(groups.items()):
        prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p))
        target, module = KOHYA_PREFIXES[prefix], name[len(prefix):]
        if target != "unet" and module.startswith("text_model_"):
            module = module[len("text_model_"):]
        down, up = _pair(parts.get("lora_down.weight"), parts.get("lora_up.weight"), name, path,
                         "lora_down.weight", "lora_up.weight")
        alpha = parts.get("alpha")
        if alpha is None:
            alpha = down.shape[0]  # no alpha: alpha = rank, a factor of 1 (kohya's and diffusers' rule)
        elif np.asarray(alpha).size != 1:
            raise LoRAError(f"{path}: {name}.alpha has shape {tuple(np.shape(alpha))}; expected one number")
        alpha = _finite_number(float(np.asarray(alpha, dtype=np.float64).reshape(())), f"{path}: {name}.alpha")
        layers.append(LoRALayer(target, module, down, up, alpha))
    return layers  # module keys still in kohya's underscore form; `_resolve` maps them to the model's


def _read_diffusers(state: dict, metadata: dict, path: str) -> list:
    """{unet.<module>.lora_A.weight, .lora_B.weight, text_encoder.<module>...} -> LoRALayer per module."""
    configs = {}
    if metadata.get(METADATA_KEY):
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except (ValueError, RecursionError) as e:
            raise LoRAError(f"{path}: header metadata {METADATA_KEY} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LoRAError(f"{path}: header metadata {METADATA_KEY} must be a JSON object, not "
                            f"{type(raw).__name__}")
        for key, value in raw.items():
            part, _, field = key.partition(".")
            configs.setdefault(part, {})[field] = _metadata_value(path, key, field, value)
    groups = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise LoRAError(f"{path}: key {key!r} is not a diffusers LoRA key (<module>.lora_A.weight or "
                            "<module>.lora_B.weight)")
        groups.setdefault(m.group(1), {})[m.group(2)] = value
    layers = []
    for name, parts in sorted(groups.items()):
        prefix = next((p for p in DIFFUSERS_PREFIXES if name.startswith(p)), None)
        target, module = (DIFFUSERS_PREFIXES[prefix], name[len(prefix):]) if prefix else ("unet", name)
        if target != "unet" and module.startswith("text_model."):
            module = module[len("text_model."):]  # transformers 4's wrapper attribute
        down, up = _pair(parts.get("A"), parts.get("B"), name, path, "lora_A.weight", "lora_B.weight")
        config = configs.get(target, {})
        if config.get("use_dora"):
            raise LoRAError(f"{path}: the {target} adapter uses DoRA (use_dora), which refldm does not implement")
        alpha = config.get("lora_alpha", down.shape[0])  # no metadata: alpha = rank (diffusers' rule)
        for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT's rule: the first match wins
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        layers.append(LoRALayer(target, module, down, up, float(alpha), bool(config.get("use_rslora", False))))
    return layers


def _metadata_value(path, key, field, value):
    """One PEFT config field of the metadata, checked for its type: numbers finite, flags booleans,
    alpha_pattern a {regex: finite number} table whose patterns compile."""
    where = f"{path}: header metadata {METADATA_KEY}: {key}"
    if field == "lora_alpha":
        return _finite_number(value, where)
    if field in ("use_rslora", "use_dora"):
        if not isinstance(value, bool):
            raise LoRAError(f"{where} must be true or false, not {value!r}")
        return value
    if field == "alpha_pattern":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise LoRAError(f"{where} must be an object of {{pattern: alpha}}, not {type(value).__name__}")
        for pattern, alpha in value.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoRAError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None
            _finite_number(alpha, f"{where}[{pattern!r}]")
        return value
    return value  # other PEFT fields (r, target_modules, ...) are not read


def _finite_number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or abs(float(value)) > MAX_ALPHA:
        raise LoRAError(f"{where} must be a finite number of magnitude <= {MAX_ALPHA:g}, not {value!r}")
    return float(value)


def _pair(down, up, name, path, down_key, up_key):
    if down is None or up is None:
        missing = down_key if down is None else up_key
        raise LoRAError(f"{path}: {name} has no {missing}")
    down, up = np.asarray(down), np.asarray(up)
    rank = down.shape[0] if down.ndim else 0
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank:
        raise LoRAError(f"{path}: {name}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} are not "
                        "a rank-r pair ((r, in) and (out, r), or (r, in, k, k) and (out, r, 1, 1))")
    if down.ndim == 4 and up.shape[2:] != (1, 1):
        raise LoRAError(f"{path}: {name}: {up_key} {tuple(up.shape)} must be a 1x1 kernel (out, r, 1, 1)")
    if rank < 1:
        raise LoRAError(f"{path}: {name}: rank 0 ({down_key} {tuple(down.shape)}): a LoRA layer needs rank >= 1")
    for key, array in ((down_key, down), (up_key, up)):
        if not np.issubdtype(array.dtype, np.floating):
            raise LoRAError(f"{path}: {name}.{key} has dtype {array.dtype}; expected floating point")
        if not np.all(np.isfinite(array)):
            raise LoRAError(f"{path}: {name}.{key} holds NaN or inf")
    return down, up


# ----------------------------------------------------------------------------------------------------------
# Finding the layers in a model, checking everything, then changing it


def _models(pipe_or_models) -> dict:
    """{"unet": ..., "text_encoder": ...} from a pipeline or a dict of models."""
    if isinstance(pipe_or_models, dict):
        return dict(pipe_or_models)
    return {name: getattr(pipe_or_models, name) for name in ("unet", "text_encoder")
            if getattr(pipe_or_models, name, None) is not None}


def _layers_of(model) -> dict:
    """{module key: module} for every Linear / Conv2d of a model (the layers a LoRA can adapt)."""
    from refldm.models.blocks import Conv2d, Linear

    found = {}

    def walk(module):
        for _, child in module.children():
            if isinstance(child, (Linear, Conv2d)):
                found[child._name] = child
            walk(child)
    walk(model)
    return found


def _resolve(lora: LoRA, models: dict) -> list:
    """[(layer, module)] for every layer of the file; every failure raises before anything changes."""
    tables = {}
    for target in sorted(lora.targets):
        if target not in models:
            have = ", ".join(sorted(models)) or "none"
            raise LoRAError(f"{lora.path}: adapts the {target}, which this model has not (it has: {have})")
        layers = _layers_of(models[target])
        if lora.format == "kohya":  # kohya writes the module key with "_" for ".": match on that form
            layers = {key.replace(".", "_"): module for key, module in layers.items()}
        tables[target] = layers
    matched, missing = [], []
    for layer in lora.layers:
        module = tables[layer.target].get(layer.key)
        if module is None:
            missing.append(f"{layer.target}:{layer.key}")
        else:
            matched.append((layer, module))
    if missing:
        few = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LoRAError(f"{lora.path}: {len(missing)} of {len(lora.layers)} LoRA layers match no layer of the "
                        f"model: {few}; refused (is it for another architecture?)")
    for layer, module in matched:
        w = tuple(module.weight.shape)
        if layer.down.ndim == 2:
            ok = len(w) == 2 and layer.down.shape[1] == w[1] and layer.up.shape[0] == w[0]
            if not ok and len(w) == 4 and w[2:] == (1, 1):  # a 1x1 conv adapted by a linear LoRA
                ok = layer.down.shape[1] == w[1] and layer.up.shape[0] == w[0]
        else:
            ok = (len(w) == 4 and layer.down.shape[1:] == w[1:] and layer.up.shape[0] == w[0]) or \
                 (len(w) == 2 and layer.down.shape[1:] == (w[1], 1, 1) and layer.up.shape[0] == w[0])
        if not ok:
            raise LoRAError(f"{lora.path}: {layer.target}:{layer.key}: "
                            f"down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)} do not fit the "
                            f"weight {w} (rank {layer.rank})")
    return matched


def apply_loras(pipe_or_models, loras, merge: bool = True) -> None:
    """Apply LoRAs: ``loras`` is a list of (path or `LoRA`, scale); each is checked fully first.

    merge=True: W <- W + scale * (alpha / r) * B A, computed in float64 and added in the weight's dtype
    (diffusers' ``fuse_lora``). merge=False: the layer keeps W and adds scale * (alpha / r) * B(A(x)) in
    its forward pass (diffusers' ``set_adapters``). Several LoRAs add up.

    Every file is read and checked, and every new weight (or branch) computed and checked finite in the
    weight's dtype, before the first layer changes: a refusal leaves every weight bit for bit as it was.
    """
    models = _models(pipe_or_models)
    plans = []
    for item, scale in loras:
        lora = item if isinstance(item, LoRA) else load_lora(item)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_ALPHA:
            raise LoRAError(f"{lora.path}: scale {scale!r} must be a finite number of magnitude <= {MAX_ALPHA:g}")
        plans.append((lora, float(scale), _resolve(lora, models)))
    if merge:
        new_weights = {}  # id(module) -> (module, W + the sum of its deltas), all computed before any change
        for lora, scale, matched in plans:
            for layer, module in matched:
                _, w = new_weights.get(id(module), (module, module.weight))
                new_weights[id(module)] = (module, _merged(w, layer, scale, lora.path))
        for module, w in new_weights.values():
            if "_lora_original" not in vars(module):
                module._lora_original = module.weight  # the array itself, kept for an exact restore
            module.weight = w                          # a new array; the original stays untouched
        return
    branches = [(module, _branch(module, layer, scale, lora.path)) for lora, scale, matched in plans
                for layer, module in matched]
    for module, branch in branches:
        _attach(module, branch)
    for model in models.values():
        _route_geglu(model)


def _merged(w, layer: LoRALayer, scale: float, path: str):
    """W + scale * factor * B A in W's dtype, refused where any value is not finite there."""
    delta = (scale * layer.delta()).reshape(w.shape)           # float64 on the host
    merged = w + backend.asarray(delta, dtype=w.dtype)
    if not bool(backend.array_namespace(merged).all(backend.array_namespace(merged).isfinite(merged))):
        raise LoRAError(f"{path}: {layer.target}:{layer.key}: the merged weight overflows {w.dtype} "
                        f"(scale {scale:g} * alpha/r {layer.factor:g} * B A); refused, nothing changed")
    return merged


def _branch(module, layer: LoRALayer, scale: float, path: str):
    """(down, up, s) in the layer's dtype and shapes, s = scale * factor; refused where not finite."""
    w = module.weight
    s = scale * layer.factor
    down = backend.asarray(layer.down, dtype=w.dtype)
    up = backend.asarray(layer.up, dtype=w.dtype)
    xp = backend.array_namespace(down)
    if not (math.isfinite(s) and bool(xp.all(xp.isfinite(down))) and bool(xp.all(xp.isfinite(up)))):
        raise LoRAError(f"{path}: {layer.target}:{layer.key}: the branch overflows {w.dtype}; refused, "
                        "nothing changed")
    if down.ndim == 2 and w.ndim == 4:  # linear LoRA on a 1x1 conv: the same map, as 1x1 kernels
        down, up = down.reshape(down.shape + (1, 1)), up.reshape(up.shape + (1, 1))
    if down.ndim == 4 and w.ndim == 2:  # 1x1 conv LoRA on a linear layer
        down, up = down.reshape(down.shape[:2]), up.reshape(up.shape[:2])
    return down, up, s


def _attach(module, branch) -> None:
    """Add the branch s * B(A(x)) (from `_branch`) to this module's forward pass."""
    if "_lora_branches" not in vars(module):
        module._lora_branches = []
        module.forward = _forward_with_branches.__get__(module)
    module._lora_branches.append(branch)


def _forward_with_branches(self, x):
    """The layer's own forward, plus sum over LoRAs of s * B(A(x)) (conv: A with the layer's stride / padding)."""
    y = type(self).forward(self, x)
    for down, up, s in self._lora_branches:
        if down.ndim == 2:
            branch = F.linear(F.linear(x, down), up)                                    # (..., in) -> r -> out
        else:
            branch = F.conv2d(F.conv2d(x, down, stride=self.stride, padding=self.padding), up)  # 1x1 up
        y = y + s * branch
    return y


def _route_geglu(model) -> None:
    """A GEGLU block reads its proj's weight directly (one fused op); with a branch on that proj it must
    call the layer instead: [h, g] = proj(x) (branches included), out = h * gelu(g), the same equation."""
    for module in _all_modules(model):
        proj = getattr(module, "proj", None)
        if type(module).__name__ == "GEGLU" and proj is not None and "_lora_branches" in vars(proj):
            if "_lora_geglu" not in vars(module):
                module._lora_geglu = True
                module.forward = _geglu_through_layer.__get__(module)


def _geglu_through_layer(self, x):
    proj = self.proj(x)                                   # (..., 2 * D_out), with the LoRA branches
    half = proj.shape[-1] // 2
    return proj[..., :half] * F.gelu(proj[..., half:])    # h * gelu(g)


def _all_modules(model):
    yield model
    for _, child in model.children():
        yield from _all_modules(child)


def remove_loras(pipe_or_models) -> int:
    """Undo every LoRA: merged weights get their original arrays back, branches are dropped. Returns how
    many layers were restored."""
    restored = 0
    for model in _models(pipe_or_models).values():
        for module in _layers_of(model).values():
            state, changed = vars(module), False
            if "_lora_original" in state:
                module.weight = state.pop("_lora_original")
                changed = True
            if "_lora_branches" in state:
                del state["_lora_branches"], state["forward"]
                changed = True
            restored += changed
        for module in _all_modules(model):
            if vars(module).pop("_lora_geglu", None):
                del vars(module)["forward"]
    return restored


def adapted_layers(pipe_or_models) -> list:
    """The keys "unet:<module>" of the layers that carry a merged or on-the-fly LoRA now."""
    out = []
    for name, model in _models(pipe_or_models).items():
        for key, module in _layers_of(model).items():
            if "_lora_original" in vars(module) or "_lora_branches" in vars(module):
                out.append(f"{name}:{key}")
    return out
