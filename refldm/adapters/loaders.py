"""diffusers' spellings of the adapter calls, as pipeline methods over refldm's own functions.

A diffusers user writes

    pipe.load_lora_weights("folder", weight_name="x.safetensors", adapter_name="x")   # the new adapter alone is on
    pipe.set_adapters(["x", "y"], adapter_weights=[0.8, 0.5])                        # several, each at its weight
    pipe.fuse_lora(lora_scale=0.7)          # W <- W + 0.7 * w_a * (alpha / r) B A for each active adapter a
    pipe.unfuse_lora()                      # the original weights back, bit for bit
    pipe.disable_lora(); pipe.enable_lora() # the plain model, then the adapters again
    pipe.unload_lora_weights()              # every adapter gone (fused weights stay fused, as in diffusers)
    pipe.load_textual_inversion("emb.safetensors", token="<cat>")

and refldm does the same with the code the CLI uses: `refldm.adapters.lora.apply_loras` (merged for fused
adapters, on the fly for the others) and `remove_loras`, and `textual_inversion.load_textual_inversion`.
The mixin keeps the adapters parsed (``LoRA``), their weights, which are active and which fused; after each
call the model is rebuilt from that state: every adapted layer restored (`remove_loras`), then the fused
adapters merged and the active ones attached as branches:

    y = x (W + sum_{a fused} s_a * f_a * B_a A_a)^T + sum_{a active, not fused} w_a * f_a * (x A_a^T) B_a^T

with f_a = alpha_a / r_a, s_a = lora_scale * w_a at fusing time. A refused call (a bad file, an unknown
adapter name, an overflow) leaves the model and the state as they were. The methods own the adapted
layers: a LoRA applied with `apply_loras` directly is undone by the next method call (use one or the other).

One difference from diffusers: peft unfuses by subtracting the delta at the adapter's weight at that
moment, so changing the weight between `fuse_lora` and `unfuse_lora` leaves part of the fusion in
diffusers' weights; refldm puts the original arrays back whatever the weights.
"""

from __future__ import annotations

import os

from refldm.adapters import lora as lora_module
from refldm.adapters import textual_inversion

__all__ = ["LoraLoaderMixin", "TextualInversionLoaderMixin", "IPAdapterMixin"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"    # diffusers' file name in a LoRA folder
EMBEDDING_WEIGHT_NAME = "learned_embeds.safetensors"     # diffusers' file name in a textual-inversion folder


def _file(path_or_dir, weight_name, default, what):
    """A file path from diffusers' (path or folder, weight_name) pair; one clear line when it is not there."""
    if isinstance(path_or_dir, dict):
        raise TypeError(f"{what}: a state dict is not accepted; pass a .safetensors file or a folder holding one")
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, weight_name or default)
    elif weight_name is not None:
        raise FileNotFoundError(f"{what}: {path} is not a folder (weight_name={weight_name!r} names a file in one)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path} (refldm reads local files only; a Hub id is not fetched)")
    return path


class LoraLoaderMixin:
    """``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` / ``disable_lora`` /
    ``enable_lora`` / ``unload_lora_weights`` / ``get_active_adapters`` / ``get_list_adapters`` on a pipeline
    with ``unet`` and ``text_encoder`` (diffusers' names and arguments; see the module docstring)."""

    def _lora(self) -> dict:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__["_lora_state"] = {"adapters": {}, "weights": {}, "active": [], "fused": {},
                                                    "enabled": True}
        return state

    def _lora_rebuild(self, new_state: dict) -> None:
        """Make the model match `new_state`; on a refusal, the previous state's model is put back."""
        old = self._lora()
        try:
            self._lora_apply(new_state)
        except Exception:
            self._lora_apply(old)
            raise
        self.__dict__["_lora_state"] = new_state

    def _lora_apply(self, state: dict) -> None:
        lora_module.remove_loras(self)
        if not state["enabled"]:
            return
        fused = [(state["adapters"][n], s) for n, s in state["fused"].items()]
        branches = [(state["adapters"][n], state["weights"][n]) for n in state["active"] if n not in state["fused"]]
        if fused:
            lora_module.apply_loras(self, fused, merge=True)
        if branches:
            lora_module.apply_loras(self, branches, merge=False)

    def _lora_copy(self) -> dict:
        s = self._lora()
        return {"adapters": dict(s["adapters"]), "weights": dict(s["weights"]), "active": list(s["active"]),
                "fused": dict(s["fused"]), "enabled": s["enabled"]}

    def _lora_names(self, names, what: str) -> list:
        names = [names] if isinstance(names, str) else list(names)
        known = self._lora()["adapters"]
        for name in names:
            if name not in known:
                raise ValueError(f"{what}: no adapter named {name!r} (loaded: {', '.join(known) or 'none'})")
        return names

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                          adapter_name: str | None = None, **kwargs) -> None:
        """Read a LoRA file (kohya / A1111 or diffusers / PEFT keys; a folder with `weight_name`, default
        pytorch_lora_weights.safetensors) as adapter `adapter_name` (default ``default_<n>``); as in diffusers
        it becomes the one active adapter, at weight 1. Checked completely before the model changes."""
        unknown = set(kwargs) - {"low_cpu_mem_usage", "hotswap"}
        if unknown:
            raise TypeError(f"load_lora_weights: unexpected argument {sorted(unknown)[0]!r}")
        path = _file(pretrained_model_name_or_path_or_dict, weight_name, LORA_WEIGHT_NAME, "load_lora_weights")
        state = self._lora_copy()
        if adapter_name is None:
            n = len(state["adapters"])
            while f"default_{n}" in state["adapters"]:
                n += 1
            adapter_name = f"default_{n}"
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"load_lora_weights: adapter_name must be a non-empty string, not {adapter_name!r}")
        if adapter_name in state["adapters"]:
            raise ValueError(f"load_lora_weights: adapter name {adapter_name!r} is already in use; give another "
                             "adapter_name or unload it first")
        lora = lora_module.load_lora(path)
        lora_module._resolve(lora, lora_module._models(self))  # every layer fits, before anything changes
        state["adapters"][adapter_name] = lora
        state["weights"][adapter_name] = 1.0
        state["active"] = [adapter_name]
        self._lora_rebuild(state)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Make exactly these adapters active, at these weights (one number for all, or one per adapter;
        default 1.0): their branches add w_a * (alpha / r) * B A x."""
        names = self._lora_names(adapter_names, "set_adapters")
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} adapter_weights")
        for name, w in zip(names, weights):
            if isinstance(w, dict):
                raise ValueError(f"set_adapters: per-block weights ({name!r}: {w}) are not implemented; give a number")
        state = self._lora_copy()
        state["active"] = names
        state["weights"].update({n: w for n, w in zip(names, weights)})  # apply_loras checks each is finite
        self._lora_rebuild(state)

    def get_active_adapters(self) -> list:
        return list(self._lora()["active"])

    def get_list_adapters(self) -> dict:
        """{part: [adapter names]} for the parts each loaded adapter changes."""
        out = {}
        for name, lora in self._lora()["adapters"].items():
            for target in sorted(lora.targets):
                out.setdefault(target, []).append(name)
        return out

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs) -> None:
        """Merge adapters (default: the active ones) into the weights at lora_scale * their weight:
        W <- W + lora_scale * w_a * (alpha / r) * B A. A non-finite result is always refused."""
        if components is not None and not isinstance(components, (list, tuple)):
            raise TypeError(f"fuse_lora: components must be a list of part names, not {components!r}")
        state = self._lora_copy()
        names = state["active"] if adapter_names is None else self._lora_names(adapter_names, "fuse_lora")
        for name in names:
            state["fused"][name] = lora_scale * state["weights"][name]
        self._lora_rebuild(state)

    def unfuse_lora(self, components=None, **kwargs) -> None:
        """Undo `fuse_lora`: the original weights back (the very arrays), the active adapters as branches."""
        state = self._lora_copy()
        state["fused"] = {}
        self._lora_rebuild(state)

    def disable_lora(self) -> None:
        """The plain model (every adapted layer restored); `enable_lora` brings the adapters back."""
        state = self._lora_copy()
        state["enabled"] = False
        self._lora_rebuild(state)

    def enable_lora(self) -> None:
        state = self._lora_copy()
        state["enabled"] = True
        self._lora_rebuild(state)

    def delete_adapters(self, adapter_names) -> None:
        names = self._lora_names(adapter_names, "delete_adapters")
        state = self._lora_copy()
        for name in names:
            for table in ("adapters", "weights", "fused"):
                state[table].pop(name, None)
        state["active"] = [n for n in state["active"] if n not in names]
        self._lora_rebuild(state)

    def unload_lora_weights(self) -> None:
        """Forget every adapter. As in diffusers, weights fused by `fuse_lora` stay fused (they become the
        model's weights); everything else goes back to the original weights."""
        state = self._lora_copy()
        keep = {"adapters": state["adapters"], "weights": state["weights"], "active": [],
                "fused": state["fused"] if state["enabled"] else {}, "enabled": True}
        self._lora_rebuild(keep)
        for model in lora_module._models(self).values():  # the fused weights are now the model's own
            for module in lora_module._layers_of(model).values():
                vars(module).pop("_lora_original", None)
        self.__dict__["_lora_state"] = None


class TextualInversionLoaderMixin:
    """diffusers' ``load_textual_inversion(path or [paths], token=None or [tokens], weight_name=None)``."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, weight_name: str | None = None,
                               **kwargs) -> list:
        """Add an embedding's token(s) to the tokenizer and its vectors to the text encoder (see
        `refldm.adapters.textual_inversion`); a list of files takes a list of tokens (or None). Every file is
        checked before the first is added. Returns the tokens added."""
        if kwargs.get("tokenizer") is not None or kwargs.get("text_encoder") is not None:
            raise TypeError("load_textual_inversion: tokenizer= / text_encoder= are not implemented; it loads into "
                            "the pipeline's own tokenizer and text_encoder")
        paths = pretrained_model_name_or_path
        paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(paths)
        if len(tokens) != len(paths):
            raise ValueError(f"load_textual_inversion: {len(paths)} files but {len(tokens)} tokens")
        files = [_file(p, weight_name, EMBEDDING_WEIGHT_NAME, "load_textual_inversion") for p in paths]
        if len(files) > 1:  # check them all first: the same checks load_textual_inversion makes, on every file
            width = self.text_encoder.config.hidden_size
            seen = set()
            for path, tok in zip(files, tokens):
                name, vectors = textual_inversion.load_embedding(path, tok, width)
                if vectors.shape[1] != width:
                    raise textual_inversion.TextualInversionError(
                        f"{path}: the embedding is {vectors.shape[1]} wide but the text encoder is {width} wide")
                new = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
                clash = [t for t in new if t in seen or t in self.tokenizer.vocab]
                if clash:
                    raise textual_inversion.TextualInversionError(
                        f"{path}: token {clash[0]!r} is already in the vocabulary or given twice")
                seen.update(new)
        added = []
        for path, tok in zip(files, tokens):
            added += textual_inversion.load_textual_inversion(self, path, tok)
        return added


class IPAdapterMixin:
    """diffusers' ``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on a pipeline with a
    ``unet`` (SD 1.x / 2.x, SDXL), over `refldm.adapters.ip_adapter`:

        pipe.load_ip_adapter("h94-IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors")
        pipe.set_ip_adapter_scale(0.6)
        pipe("a cat", ip_adapter_image=reference_image)
        pipe.unload_ip_adapter()

    The image encoder (`CLIPVisionModelWithProjection`) is loaded, as diffusers does, from
    ``<folder>/<subfolder>/<image_encoder_folder>`` (a name without "/"), or ``<folder>/<image_encoder_folder>``
    (a path with "/", or an absolute path), once, in the pipeline's dtype; given a file rather than a folder,
    the folder is the file's. image_encoder_folder=None loads none (then pass ip_adapter_image_embeds=)."""

    image_encoder = None
    feature_extractor = None

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None,
                        image_encoder_folder: str | None = "image_encoder", **kwargs) -> None:
        """Read the IP-Adapter file(s) (a list loads several at once, as diffusers) and attach them to the U-Net
        at scale 1; every file is checked before the U-Net changes. Safetensors only; a .bin is refused."""
        from refldm.adapters import ip_adapter
        from refldm.models.clip_vision import CLIPImageProcessor, CLIPVisionModelWithProjection
        unknown = set(kwargs) - {"low_cpu_mem_usage", "cache_dir", "local_files_only"}
        if unknown:
            raise TypeError(f"load_ip_adapter: unexpected argument {sorted(unknown)[0]!r}")
        names = weight_name if isinstance(weight_name, list) else [weight_name]
        sources = pretrained_model_name_or_path_or_dict
        sources = sources if isinstance(sources, list) else [sources] * len(names)
        if len(names) == 1 and len(sources) > 1:
            names = names * len(sources)
        subs = subfolder if isinstance(subfolder, list) else [subfolder] * len(names)
        if not len(sources) == len(names) == len(subs):
            raise ValueError(f"load_ip_adapter: {len(sources)} sources, {len(names)} weight_names and "
                             f"{len(subs)} subfolders; give one of each per IP-Adapter")
        files, folders = [], []
        for source, name, sub in zip(sources, names, subs):
            if isinstance(source, dict):
                raise TypeError("load_ip_adapter: a state dict is not accepted; pass a .safetensors file or a folder")
            source = os.fspath(source)
            folder = os.path.join(source, sub) if sub else source
            if os.path.isdir(folder):
                if name is None:
                    raise ValueError(f"load_ip_adapter: {folder} is a folder; say which file with weight_name=")
                files.append(_file(folder, name, None, "load_ip_adapter"))
            else:
                files.append(_file(folder, None, None, "load_ip_adapter"))
                source, sub = os.path.dirname(folder), None
            folders.append((source, sub))
        dtype = self.dtype.name
        adapters = [ip_adapter.load_ip_adapter_file(f, dtype=dtype) for f in files]
        encoder = self.image_encoder
        if encoder is None and image_encoder_folder is not None:
            source, sub = folders[0]
            if "/" in image_encoder_folder or os.path.isabs(image_encoder_folder):
                where = os.path.join(source, image_encoder_folder)
            else:
                where = os.path.join(source, sub, image_encoder_folder) if sub else \
                    os.path.join(source, image_encoder_folder)
            if not os.path.isdir(where):
                raise FileNotFoundError(f"load_ip_adapter: no image encoder folder {where}; give "
                                        "image_encoder_folder= (or None, and pass ip_adapter_image_embeds=)")
            encoder = CLIPVisionModelWithProjection.from_pretrained(where, dtype=dtype)
        ip_adapter.apply_ip_adapters(self.unet, adapters, dtype=dtype)
        self.image_encoder = encoder
        if self.feature_extractor is None and encoder is not None:
            self.feature_extractor = CLIPImageProcessor(encoder.config.image_size)
        self.__dict__["_ip_adapters"] = adapters

    def set_ip_adapter_scale(self, scale) -> None:
        """s in out = Attn(Q, K, V) + s Attn(Q, K_ip, V_ip): one number, or one per loaded adapter (finite, >= 0)."""
        from refldm.adapters import ip_adapter
        ip_adapter.set_ip_adapter_scale(self.unet, scale)

    def unload_ip_adapter(self) -> None:
        """Remove the adapters, the image encoder and the feature extractor: the plain pipeline, bit for bit."""
        from refldm.adapters import ip_adapter
        ip_adapter.remove_ip_adapters(self.unet)
        self.image_encoder = self.feature_extractor = None
        self.__dict__.pop("_ip_adapters", None)

    def ip_adapter_embeds(self, ip_adapter_image, ip_adapter_image_embeds, batch: int, do_cfg: bool):
        """What a pipeline call gives the U-Net as ``added_cond_kwargs["image_embeds"]``: None without an
        IP-Adapter and without images; with both, `prepare_ip_adapter_image_embeds`; one without the other is
        one clear line."""
        given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
        if not given and self.__dict__.get("_ip_adapters"):
            raise ValueError("an IP-Adapter is loaded: give ip_adapter_image= (or ip_adapter_image_embeds=), or "
                             "call unload_ip_adapter() first")
        return self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, batch, do_cfg) \
            if given else None

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, batch: int, do_cfg: bool):
        """diffusers' function of the same name: -> [one array per adapter, (B, n, ...) or with CFG
        [negative rows; positive rows] (2B, n, ...)], n the images given to that adapter.

        ip_adapter_image: one image (or a list of images) per adapter; a single adapter takes the image itself.
        ip_adapter_image_embeds: one array per adapter, (1, n, ...) or with CFG (2, n, ...) = [negative; positive]."""
        from refldm import backend
        from refldm.adapters import ip_adapter
        adapters = self.__dict__.get("_ip_adapters") or []
        if not adapters:
            raise ValueError("ip_adapter_image / ip_adapter_image_embeds given but no IP-Adapter is loaded "
                             "(pipe.load_ip_adapter)")
        if (ip_adapter_image is None) == (ip_adapter_image_embeds is None):
            raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both")
        pairs = []
        if ip_adapter_image_embeds is None:
            several = isinstance(ip_adapter_image, list) and len(adapters) > 1
            images = ip_adapter_image if several else [ip_adapter_image]     # one adapter: the image(s) itself
            if len(images) != len(adapters):
                raise ValueError(f"ip_adapter_image gives {len(images)} entr{'y' if len(images) == 1 else 'ies'} for "
                                 f"{len(adapters)} IP-Adapters; give one image (or list of images) per adapter")
            if self.image_encoder is None:
                raise ValueError("ip_adapter_image needs an image encoder; load_ip_adapter found none "
                                 "(image_encoder_folder=None): pass ip_adapter_image_embeds= instead")
            for image, adapter in zip(images, adapters):
                cond, uncond = ip_adapter.encode_image(self.image_encoder, self.feature_extractor, image,
                                                       adapter.uses_hidden_states)   # (n, ...) each
                pairs.append((cond[None], uncond[None]))                              # (1, n, ...)
        else:
            embeds = list(ip_adapter_image_embeds)
            if len(embeds) != len(adapters):
                raise ValueError(f"ip_adapter_image_embeds gives {len(embeds)} arrays for {len(adapters)} IP-Adapters; "
                                 "give one per adapter")
            for e in embeds:
                e = backend.asarray(e, dtype=self.dtype)
                if do_cfg:
                    if e.shape[0] % 2:
                        raise ValueError(f"ip_adapter_image_embeds: with guidance each array holds [negative; "
                                         f"positive] on its first axis; got shape {tuple(e.shape)}")
                    half = e.shape[0] // 2
                    pairs.append((e[half:], e[:half]))
                else:
                    pairs.append((e, None))
        out = []
        for cond, uncond in pairs:
            xp = backend.array_namespace(cond)
            rows = [cond] * batch
            if do_cfg:
                rows = [uncond] * batch + rows
            out.append(xp.concatenate(rows, axis=0))                                 # (B or 2B, n, ...)
        return out
