"""Original single-file Stable Diffusion checkpoints (CompVis / Stability key names) <-> diffusers keys.

A single-file SD checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_512-ema-pruned.safetensors``)
holds the three networks of the pipeline under the names of the original LDM code:

    model.diffusion_model.*                    the U-Net            (openaimodel.UNetModel)
    first_stage_model.*                        the VAE              (autoencoder.AutoencoderKL)
    cond_stage_model.transformer.text_model.*  SD 1.x text encoder  (transformers' CLIPTextModel, same keys)
    cond_stage_model.model.*                   SD 2.x text encoder  (OpenCLIP ViT-H, fused q/k/v)

and an SDXL base checkpoint (``sd_xl_base_1.0.safetensors``, Stability's generative-models code):

    model.diffusion_model.*                    the U-Net, the same layout plus label_emb (the added embedding)
    first_stage_model.*                        the VAE
    conditioner.embedders.0.transformer.text_model.*   text encoder 1 (CLIP ViT-L, transformers' keys)
    conditioner.embedders.1.model.*            text encoder 2 (OpenCLIP ViT-bigG, fused q/k/v, all 32
                                               layers, text_projection stored (D, P): transposed)

and an SD3 / SD3.5 file (``sd3_medium_incl_clips.safetensors``, Stability's sd3_impls / mmditx.py):

    model.diffusion_model.*                    the MMDiT (joint_blocks.{i}.x_block / context_block, fused qkv)
    first_stage_model.*                        the 16-channel VAE (the SD layout, no quant convs)
    text_encoders.clip_l.transformer.*         CLIP-L (transformers' keys; no text_projection: identity)
    text_encoders.clip_g.transformer.*         CLIP-G (transformers' keys)
    text_encoders.t5xxl.transformer.*          T5-XXL encoder (transformers' keys), when included

(see `sd3_from_original`; the MMDiT's rows are `SD3_TOP` and `SD3_BLOCK`).

refldm's models use diffusers' (and transformers') key names, so loading such a file is a renaming,
plus three changes of layout:

- the VAE's attention projections are 1x1 convolutions in the original, (C, C, 1, 1), and linear
  layers in diffusers, (C, C);
- OpenCLIP stores the query, key and value projections fused, ``in_proj_weight`` (3D, D) and
  ``in_proj_bias`` (3D,): rows [0, D) are q, [D, 2D) are k, [2D, 3D) are v;
- SD 2.x conditions on the *penultimate* OpenCLIP layer, so diffusers' text encoder has one layer less
  than the file (23 of 24): the last ``resblocks`` entry is unused.

All of it is in the tables below, read top to bottom: each row maps a diffusers module prefix to the
original module prefix (a function of the block indices and of the model's shape, ``L`` = layers per
block), and names the renaming of the leaves below it. The same rows serve both directions:
`from_original` (file -> diffusers keys, used by `StableDiffusionPipeline.from_single_file`) and
`to_original` (diffusers keys -> file, used by the tests to write a single file from a diffusers folder).

`infer_configs` reads the diffusers configs of the three networks off the tensor shapes, for a file
that comes without a config folder. Shapes do not tell everything; the conventions of SD 1.x and 2.x
fill the rest (heads: 8 per layer in SD 1.x, 64 channels per head in SD 2.x; scaling factor 0.18215).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PARTS = ("unet", "vae", "text_encoder")

# the prefix of each network in an original single file
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL text encoder 1
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL text encoder 2


class ConversionError(ValueError):
    """A single-file checkpoint whose keys do not match an SD 1.x / 2.x layout."""


# ---------------------------------------------------------------------------------------------------------------
# Leaf renamings below a module (diffusers name -> original name); a name absent here is the same in both.

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SAME = {}


@dataclass
class Shape:
    """What the key mapping needs to know of the model's shape (from the diffusers configs)."""

    layers_per_block: int = 2  # U-Net resnets per down block (up blocks have one more)
    up_attention: tuple = ()  # per U-Net up block: does it have cross-attention layers?
    vae_levels: int = 4  # VAE resolution levels (len(block_out_channels))
    text_layers: int = 12  # text encoder layers that are used


# ---------------------------------------------------------------------------------------------------------------
# THE TABLE. Rows: (diffusers module prefix, original module prefix as a function of (shape, *indices), leaves).
# "{i}" in a diffusers prefix stands for a block index; the function receives the indices in order.
# How the U-Net's blocks line up: the original numbers its blocks in one flat list per direction,
#   input_blocks:  0 = conv_in, then for each level b: L x [resnet, attention], then a downsampler
#                  (not after the last level)       -> level b, layer r is input_blocks.{1 + b(L+1) + r}
#   output_blocks: for each level b: (L+1) x [resnet, attention], the last one with an upsampler
#                  (not after the last level)       -> level b, layer r is output_blocks.{b(L+1) + r}
#   middle_block:  0 = resnet, 1 = attention, 2 = resnet

UNET_TABLE = [
    ("time_embedding.linear_1", lambda s: "time_embed.0", SAME),
    ("time_embedding.linear_2", lambda s: "time_embed.2", SAME),
    ("add_embedding.linear_1", lambda s: "label_emb.0.0", SAME),   # SDXL: pooled text + time ids
    ("add_embedding.linear_2", lambda s: "label_emb.0.2", SAME),
    ("conv_in", lambda s: "input_blocks.0.0", SAME),
    ("down_blocks.{i}.resnets.{i}", lambda s, b, r: f"input_blocks.{1 + b * (s.layers_per_block + 1) + r}.0",
     UNET_RESNET),
    ("down_blocks.{i}.attentions.{i}", lambda s, b, r: f"input_blocks.{1 + b * (s.layers_per_block + 1) + r}.1",
     SAME),
    ("down_blocks.{i}.downsamplers.0.conv", lambda s, b: f"input_blocks.{(b + 1) * (s.layers_per_block + 1)}.0.op",
     SAME),
    ("mid_block.resnets.{i}", lambda s, r: f"middle_block.{2 * r}", UNET_RESNET),
    ("mid_block.attentions.0", lambda s: "middle_block.1", SAME),
    ("up_blocks.{i}.resnets.{i}", lambda s, b, r: f"output_blocks.{b * (s.layers_per_block + 1) + r}.0",
     UNET_RESNET),
    ("up_blocks.{i}.attentions.{i}", lambda s, b, r: f"output_blocks.{b * (s.layers_per_block + 1) + r}.1",
     SAME),
    # the upsampler follows the resnet (and the attention, where the level has one) of the level's last layer
    ("up_blocks.{i}.upsamplers.0.conv",
     lambda s, b: f"output_blocks.{b * (s.layers_per_block + 1) + s.layers_per_block}."
                  f"{2 if s.up_attention[b] else 1}.conv", SAME),
    ("conv_norm_out", lambda s: "out.0", SAME),
    ("conv_out", lambda s: "out.2", SAME),
]

# The VAE's decoder levels run the other way round: diffusers' up_blocks.0 (the lowest resolution) is
# the original's up.{levels - 1}.
VAE_TABLE = [
    ("encoder.conv_in", lambda s: "encoder.conv_in", SAME),
    ("encoder.down_blocks.{i}.resnets.{i}", lambda s, i, j: f"encoder.down.{i}.block.{j}", VAE_RESNET),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", lambda s, i: f"encoder.down.{i}.downsample.conv", SAME),
    ("encoder.mid_block.resnets.{i}", lambda s, j: f"encoder.mid.block_{j + 1}", VAE_RESNET),
    ("encoder.mid_block.attentions.0", lambda s: "encoder.mid.attn_1", VAE_ATTENTION),
    ("encoder.conv_norm_out", lambda s: "encoder.norm_out", SAME),
    ("encoder.conv_out", lambda s: "encoder.conv_out", SAME),
    ("quant_conv", lambda s: "quant_conv", SAME),
    ("post_quant_conv", lambda s: "post_quant_conv", SAME),
    ("decoder.conv_in", lambda s: "decoder.conv_in", SAME),
    ("decoder.mid_block.resnets.{i}", lambda s, j: f"decoder.mid.block_{j + 1}", VAE_RESNET),
    ("decoder.mid_block.attentions.0", lambda s: "decoder.mid.attn_1", VAE_ATTENTION),
    ("decoder.up_blocks.{i}.resnets.{i}", lambda s, i, j: f"decoder.up.{s.vae_levels - 1 - i}.block.{j}",
     VAE_RESNET),
    ("decoder.up_blocks.{i}.upsamplers.0.conv", lambda s, i: f"decoder.up.{s.vae_levels - 1 - i}.upsample.conv",
     SAME),
    ("decoder.conv_norm_out", lambda s: "decoder.norm_out", SAME),
    ("decoder.conv_out", lambda s: "decoder.conv_out", SAME),
]

# SD 1.x: the text encoder *is* transformers' CLIPTextModel, under the prefix
# cond_stage_model.transformer.text_model.; every key is the same.
CLIP_TABLE = [("", lambda s: "", SAME)]

# SD 2.x: OpenCLIP's text tower. "in_proj" rows name a third of a fused tensor (see `_QKV`).
OPEN_CLIP_TABLE = [
    ("embeddings.token_embedding", lambda s: "token_embedding", SAME),
    ("embeddings.position_embedding.weight", lambda s: "positional_embedding", SAME),
    ("encoder.layers.{i}.layer_norm1", lambda s, i: f"transformer.resblocks.{i}.ln_1", SAME),
    ("encoder.layers.{i}.self_attn.q_proj", lambda s, i: f"transformer.resblocks.{i}.attn.in_proj", SAME),
    ("encoder.layers.{i}.self_attn.k_proj", lambda s, i: f"transformer.resblocks.{i}.attn.in_proj", SAME),
    ("encoder.layers.{i}.self_attn.v_proj", lambda s, i: f"transformer.resblocks.{i}.attn.in_proj", SAME),
    ("encoder.layers.{i}.self_attn.out_proj", lambda s, i: f"transformer.resblocks.{i}.attn.out_proj", SAME),
    ("encoder.layers.{i}.layer_norm2", lambda s, i: f"transformer.resblocks.{i}.ln_2", SAME),
    ("encoder.layers.{i}.mlp.fc1", lambda s, i: f"transformer.resblocks.{i}.mlp.c_fc", SAME),
    ("encoder.layers.{i}.mlp.fc2", lambda s, i: f"transformer.resblocks.{i}.mlp.c_proj", SAME),
    ("final_layer_norm", lambda s: "ln_final", SAME),
    ("text_projection.weight", lambda s: "text_projection", SAME),  # SDXL: stored transposed, (D, P)
]
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}  # which third of in_proj_weight / in_proj_bias

# Keys of the original file that no diffusers model uses (besides everything outside the three prefixes:
# the noise schedule buffers betas/alphas_cumprod/..., EMA copies model_ema.*, training state).
IGNORED = [
    re.compile(r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids"),  # a constant arange
    re.compile(r"cond_stage_model\.model\.(text_projection|logit_scale)"),  # CLIP's contrastive head
    re.compile(r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids"),
    re.compile(r"conditioner\.embedders\.1\.model\.logit_scale"),
]


def _compile(table):
    """Each row's diffusers prefix as a regex: "{i}" captures an index, the rest of the key is group "rest"."""
    rows = []
    for pattern, fn, leaves in table:
        regex = re.escape(pattern).replace(re.escape("{i}"), r"(\d+)")
        regex = rf"^{regex}(?:\.(?P<rest>.+))?$" if pattern else r"^(?P<rest>.+)$"
        rows.append((re.compile(regex), fn, leaves))
    return rows


_TABLES = {"unet": _compile(UNET_TABLE), "vae": _compile(VAE_TABLE), "clip": _compile(CLIP_TABLE),
           "open_clip": _compile(OPEN_CLIP_TABLE)}
_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": CLIP_PREFIX, "open_clip": OPEN_CLIP_PREFIX,
             "xl_clip": XL_CLIP_PREFIX, "xl_open_clip": XL_OPEN_CLIP_PREFIX}
_TABLES.update(xl_clip=_TABLES["clip"], xl_open_clip=_TABLES["open_clip"])  # the same rows, other prefixes


@dataclass(frozen=True)
class Target:
    """Where a diffusers tensor lives in the original file, and how its layout differs."""

    key: str  # the original key
    conv1x1: bool = False  # stored as (C_out, C_in, 1, 1) there, (C_out, C_in) in diffusers
    third: int | None = None  # 0/1/2: the q/k/v third (rows) of a fused in_proj tensor
    transpose: bool = False  # stored transposed there (OpenCLIP's text_projection: x @ P, not x @ W^T)
    swap_halves: bool = False  # rows [shift; scale] there, [scale; shift] in diffusers (SD3's AdaLayerNormContinuous)


def original_key(table: str, key: str, shape: Shape) -> Target:
    """The original key of diffusers key `key` of network `table` ("unet", "vae", "clip", "open_clip")."""
    bare = key[len("text_model."):] if table != "unet" and table != "vae" and key.startswith("text_model.") \
        else key
    for regex, fn, leaves in _TABLES[table]:
        m = regex.match(bare)
        if not m:
            continue
        indices = [int(g) for g in m.groups()[:-1]]
        prefix = fn(shape, *indices)
        rest = m.group("rest") or ""
        leaf = rest
        for new, old in leaves.items():  # rename the leaf module (resnet / attention parts)
            if rest == new or rest.startswith(new + "."):
                leaf = old + rest[len(new):]
                break
        if table.endswith("open_clip") and prefix == "text_projection":
            return Target(_PREFIXES[table] + prefix, transpose=True)
        if table.endswith("open_clip") and prefix.endswith(".attn.in_proj"):
            third = _QKV[bare.split(".")[-2]]
            return Target(f"{_PREFIXES[table]}{prefix}_{rest}", third=third)  # in_proj_weight / in_proj_bias
        joined = ".".join(p for p in (prefix, leaf) if p)
        conv1x1 = leaves is VAE_ATTENTION and rest.endswith("weight") and not rest.startswith("group_norm")
        return Target(_PREFIXES[table] + joined, conv1x1=conv1x1)
    raise ConversionError(f"no rule in refldm/checkpoints/convert.py maps {table} key {key!r} to an original checkpoint key")


# ---------------------------------------------------------------------------------------------------------------


def detect(keys) -> str:
    """Which single-file layout the keys follow: "sd1" (CLIP ViT-L text encoder), "sd2" (OpenCLIP) or
    "sdxl" (both, under conditioner.embedders.*)."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if any(k.startswith(XL_CLIP_PREFIX) for k in keys) and any(k.startswith(XL_OPEN_CLIP_PREFIX) for k in keys):
            return "sdxl"
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ConversionError("this single file is an SDXL refiner (conditioner.embedders.0.model.*); refldm "
                                  "reads SDXL base single files only: load the refiner's diffusers folder")
        found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")})
        raise ConversionError(f"an SDXL-like file whose text encoders are not SDXL's: found {', '.join(found[:4])}")
    if is_sd3(keys):
        raise ConversionError("an SD3 / SD3.5 single file (model.diffusion_model.joint_blocks.*); load it with "
                              "StableDiffusion3Pipeline.from_single_file")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    if not has_unet or not has_vae:
        missing = [p for p, ok in ((UNET_PREFIX, has_unet), (VAE_PREFIX, has_vae)) if not ok]
        found = sorted({k.split(".")[0] for k in keys})
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} in all)" if len(found) > 6 else "")
        raise ConversionError(f"neither an SD 1.x/2.x nor an SDXL single-file checkpoint: no keys under "
                              f"{', '.join(missing)}* (found top-level names: {shown or 'none'}; a lone U-Net, "
                              "VAE or LoRA file cannot be loaded as a pipeline)")
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd1"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "sd2"
    raise ConversionError(f"no text encoder found: neither {CLIP_PREFIX}* (SD 1.x) nor {OPEN_CLIP_PREFIX}* "
                          "(SD 2.x) keys are in the file")


def shape_of(configs: dict) -> Shape:
    """The `Shape` of a model from its diffusers configs {"unet": {...}, "vae": {...}, "text_encoder": {...}}."""
    unet, vae, text = configs["unet"], configs["vae"], configs.get("text_encoder") or configs["text_encoder_2"]
    layers = unet.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ConversionError(f"unet config: layers_per_block={layers!r}; the single-file layout needs one int")
    up_types = unet.get("up_block_types", ())
    return Shape(layers_per_block=layers, up_attention=tuple("CrossAttn" in t for t in up_types),
                 vae_levels=len(vae.get("block_out_channels", ())),
                 text_layers=int(text.get("num_hidden_layers", 12)))


def _tables(kind: str) -> dict:
    if kind == "sdxl":
        return {"unet": "unet", "vae": "vae", "text_encoder": "xl_clip", "text_encoder_2": "xl_open_clip"}
    return {"unet": "unet", "vae": "vae", "text_encoder": "clip" if kind == "sd1" else "open_clip"}


def _kept(value):
    """A memory-mapped StoredTensor as it is (rows and 1x1 kernels are taken as views of it); anything else as an
    array."""
    return value if hasattr(value, "bind") else np.asarray(value)


def from_original(state: dict, expected: dict, configs: dict, kind: str, source: str = "checkpoint") -> dict:
    """Rename an original single file's tensors to diffusers keys.

    state: {original key: array} as read from the file. expected: {part: iterable of the diffusers keys
    the part's model declares}. Returns {part: {diffusers key: array}}. Every expected key must be found
    and every key under the three network prefixes must be used (or be a known unused one); otherwise
    one ConversionError lists the keys at fault.
    """
    shape = shape_of(configs)
    tables = _tables(kind)
    used, missing, out = set(), [], {}
    for part, keys in expected.items():
        out[part] = {}
        for key in keys:
            t = original_key(tables[part], key, shape)
            if t.key not in state:
                missing.append(t.key)
                continue
            value = _kept(state[t.key])  # a StoredTensor (weights_dtype="stored") stays mapped
            if t.third is not None:
                if value.shape[0] % 3:
                    raise ConversionError(f"{source}: {t.key} has {value.shape[0]} rows, not a multiple of 3 "
                                          "(fused q, k, v)")
                n = value.shape[0] // 3
                value = value[t.third * n:(t.third + 1) * n]
            elif t.transpose:
                value = np.ascontiguousarray(np.asarray(value).T)  # C-ordered: the bytes of a folder load
            elif t.conv1x1 and value.ndim == 4:
                if value.shape[2:] != (1, 1):
                    raise ConversionError(f"{source}: {t.key} has shape {value.shape}, expected a 1x1 convolution")
                value = value[:, :, 0, 0]
            out[part][key] = value
            used.add(t.key)
    leftover = []
    for k in state:
        if k in used or not k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")):
            continue
        if any(r.fullmatch(k) for r in IGNORED):
            continue
        m = re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", k)
        if kind == "sd2" and m and int(m.group(1)) >= shape.text_layers:
            continue  # SD 2.x uses the penultimate layer: the last resblock is not part of the text encoder
        leftover.append(k)
    problems = []
    for label, keys in (("missing", sorted(set(missing))), ("not understood", sorted(leftover))):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ConversionError(f"{source} does not match the {kind.upper()} single-file layout of the given "
                              "configs: " + "; ".join(problems))
    return out


def to_original(parts: dict, configs: dict, kind: str) -> dict:
    """The inverse of `from_original`: {part: {diffusers key: array}} -> {original key: array}.

    Used to write an original-layout single file from a diffusers folder (the tests do, to check the
    table against diffusers' own single-file loader, which maps keys independently).
    """
    shape = shape_of(configs)
    tables = _tables(kind)
    out, fused = {}, {}
    for part, state in parts.items():
        for key, value in state.items():
            if key.endswith("position_ids"):
                continue
            value = np.asarray(value)
            t = original_key(tables[part], key, shape)
            if t.third is not None:
                fused.setdefault(t.key, [None, None, None])[t.third] = value
            elif t.transpose:
                out[t.key] = np.ascontiguousarray(value.T)
            elif t.conv1x1:
                out[t.key] = value[:, :, None, None]
            else:
                out[t.key] = value
    for key, thirds in fused.items():
        if any(v is None for v in thirds):
            raise ConversionError(f"{key}: q, k and v are not all present")
        out[key] = np.concatenate(thirds, axis=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (Stability's MMDiT code). Rows: (diffusers key prefix, original key prefix, q/k/v third or None).
# Under transformer_blocks.{i} <-> joint_blocks.{i}: x_block is the image stream, context_block the text stream;
# the original fuses q, k, v into one qkv Linear (rows [q; k; v]). The last block's text modulation and the
# output modulation are [shift; scale] there and [scale; shift] in diffusers (AdaLayerNormContinuous).

SD3_PREFIXES = {"transformer": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}
SD3_TOP = [
    ("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj", "x_embedder.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    ("context_embedder", "context_embedder"), ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),                  # swap halves
]
SD3_BLOCK = [
    ("attn.to_q", "x_block.attn.qkv", 0), ("attn.to_k", "x_block.attn.qkv", 1), ("attn.to_v", "x_block.attn.qkv", 2),
    ("attn.add_q_proj", "context_block.attn.qkv", 0), ("attn.add_k_proj", "context_block.attn.qkv", 1),
    ("attn.add_v_proj", "context_block.attn.qkv", 2),
    ("attn.norm_q", "x_block.attn.ln_q", None), ("attn.norm_k", "x_block.attn.ln_k", None),          # SD3.5
    ("attn.norm_added_q", "context_block.attn.ln_q", None), ("attn.norm_added_k", "context_block.attn.ln_k", None),
    ("attn.to_out.0", "x_block.attn.proj", None), ("attn.to_add_out", "context_block.attn.proj", None),
    ("attn2.to_q", "x_block.attn2.qkv", 0), ("attn2.to_k", "x_block.attn2.qkv", 1),                    # MMDiT-X
    ("attn2.to_v", "x_block.attn2.qkv", 2), ("attn2.norm_q", "x_block.attn2.ln_q", None),
    ("attn2.norm_k", "x_block.attn2.ln_k", None), ("attn2.to_out.0", "x_block.attn2.proj", None),
    ("norm1.linear", "x_block.adaLN_modulation.1", None),
    ("norm1_context.linear", "context_block.adaLN_modulation.1", None),     # swap halves in the last block
    ("ff.net.0.proj", "x_block.mlp.fc1", None), ("ff.net.2", "x_block.mlp.fc2", None),
    ("ff_context.net.0.proj", "context_block.mlp.fc1", None), ("ff_context.net.2", "context_block.mlp.fc2", None),
]
SD3_IGNORED = [re.compile(r"text_encoders\.clip_[lg]\.transformer\.text_model\.embeddings\.position_ids"),
               re.compile(r"text_encoders\.clip_[lg]\.transformer\.logit_scale")]


def is_sd3(keys) -> bool:
    """True when the keys hold an MMDiT (model.diffusion_model.joint_blocks.*): an SD3 / SD3.5 single file."""
    return any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in keys)


def sd3_transformer_key(key: str, num_layers: int) -> Target:
    """The original key of SD3Transformer2DModel key `key` (a model with `num_layers` joint blocks)."""
    for new, old in SD3_TOP:
        if key.startswith(new + ".") or key == new:
            return Target(UNET_PREFIX + old + key[len(new):], swap_halves=new == "norm_out.linear")
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        for new, old, third in SD3_BLOCK:
            if module == new:
                swap = new == "norm1_context.linear" and i == num_layers - 1
                return Target(f"{UNET_PREFIX}joint_blocks.{i}.{old}.{leaf}", third=third, swap_halves=swap)
    raise ConversionError(f"no rule in refldm/checkpoints/convert.py maps SD3 transformer key {key!r} to an "
                          "original checkpoint key")


def _sd3_target(part: str, key: str, configs: dict) -> Target:
    if part == "transformer":
        return sd3_transformer_key(key, int(configs["transformer"]["num_layers"]))
    if part == "vae":
        shape = Shape(vae_levels=len(configs["vae"].get("block_out_channels", ())))
        return original_key("vae", key, shape)
    if part in ("text_encoder", "text_encoder_2"):  # transformers' CLIP keys (text_model.*) under a prefix
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        inner = bare if bare.startswith("text_projection") else "text_model." + bare
        return Target(SD3_PREFIXES[part] + inner)
    return Target(SD3_PREFIXES[part] + key)          # T5: transformers' keys under a prefix


def _swap_halves(value):
    half = value.shape[0] // 2
    return np.concatenate([value[half:], value[:half]], axis=0)


def sd3_from_original(state: dict, expected: dict, configs: dict, source: str = "checkpoint") -> dict:
    """Rename an SD3 / SD3.5 single file's tensors to diffusers keys: {part: {diffusers key: array}} for the
    parts in `expected` ({part: the diffusers keys its model declares}; "transformer", "vae", "text_encoder",
    "text_encoder_2", optionally "text_encoder_3"). As diffusers' single-file loader, CLIP-L's text_projection,
    absent from these files, is the identity. One ConversionError lists every missing or unused key."""
    used, missing, out = set(), [], {}
    for part, keys in expected.items():
        out[part] = {}
        for key in keys:
            t = _sd3_target(part, key, configs)
            if t.key not in state:
                if part == "text_encoder" and key == "text_projection.weight":
                    width = np.asarray(state[SD3_PREFIXES[part] + "text_model.final_layer_norm.weight"]).shape[0]
                    out[part][key] = np.eye(width, dtype=np.float32)
                    continue
                missing.append(t.key)
                continue
            value = _kept(state[t.key])  # a StoredTensor (weights_dtype="stored") stays mapped
            if t.third is not None:
                if value.shape[0] % 3:
                    raise ConversionError(f"{source}: {t.key} has {value.shape[0]} rows, not a multiple of 3 "
                                          "(fused q, k, v)")
                n = value.shape[0] // 3
                value = value[t.third * n:(t.third + 1) * n]
            elif t.swap_halves:
                value = _swap_halves(np.asarray(value))
            elif t.conv1x1 and value.ndim == 4:
                value = value[:, :, 0, 0]
            out[part][key] = value
            used.add(t.key)
    prefixes = tuple(SD3_PREFIXES[p] for p in expected)
    leftover = [k for k in state if k not in used and k.startswith(prefixes)
                and not any(r.fullmatch(k) for r in SD3_IGNORED)]
    problems = []
    for label, keys in (("missing", sorted(set(missing))), ("not understood", sorted(leftover))):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ConversionError(f"{source} does not match the SD3 single-file layout of the given configs: "
                              + "; ".join(problems))
    return out


def sd3_to_original(parts: dict, configs: dict) -> dict:
    """The inverse of `sd3_from_original` (the tests write an SD3 single file from a diffusers folder with it)."""
    out, fused = {}, {}
    for part, state in parts.items():
        for key, value in state.items():
            if key.endswith("position_ids"):
                continue
            value = np.asarray(value)
            t = _sd3_target(part, key, configs)
            if t.third is not None:
                fused.setdefault(t.key, [None, None, None])[t.third] = value
            elif t.swap_halves:
                out[t.key] = _swap_halves(value)
            elif t.conv1x1:
                out[t.key] = value[:, :, None, None]
            else:
                out[t.key] = value
    for key, thirds in fused.items():
        if any(v is None for v in thirds):
            raise ConversionError(f"{key}: q, k and v are not all present")
        out[key] = np.concatenate(thirds, axis=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Configs from shapes, for a single file that comes without a diffusers config folder.


def _count(keys, pattern) -> int:
    """1 + the largest index matched by `pattern` (a regex with one (\\d+) group) in `keys`, or 0."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def infer_configs(state: dict, kind: str) -> dict:
    """Diffusers configs {"unet", "vae", "text_encoder"} of an SD 1.x / 2.x single file, read off its shapes."""
    keys = list(state)
    u = UNET_PREFIX

    def shape(key):
        if key not in state:
            raise ConversionError(f"cannot infer the model's configuration: key {key!r} is missing")
        return tuple(state[key].shape)

    # U-Net: the first downsampler sits at input_blocks.{L+1}; each level has L+1 input blocks but the last
    op = re.compile(re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    down_ids = sorted(int(m.group(1)) for k in keys if (m := op.match(k)))
    n_input = _count(keys, re.escape(u) + r"input_blocks\.(\d+)\.")
    if down_ids:
        layers = down_ids[0] - 1
    else:
        layers = n_input - 1
    levels = n_input // (layers + 1)
    block_out, down_types, up_types = [], [], []
    for b in range(levels):
        first = f"{u}input_blocks.{1 + b * (layers + 1)}"
        block_out.append(shape(f"{first}.0.out_layers.3.weight")[0])
        down_types.append("CrossAttnDownBlock2D" if f"{first}.1.proj_in.weight" in state else "DownBlock2D")
        up = f"{u}output_blocks.{b * (layers + 1)}.1.proj_in.weight"
        up_types.append("CrossAttnUpBlock2D" if up in state else "UpBlock2D")
    attn = next((k for k in keys if k.startswith(u) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.startswith(u) and k.endswith(".proj_in.weight")), None)
    if attn is None or proj_in is None:
        raise ConversionError("cannot infer the U-Net's configuration: it has no cross-attention layers")
    linear_proj = len(shape(proj_in)) == 2
    depth = _count(keys, re.escape(proj_in[: -len("proj_in.weight")]) + r"transformer_blocks\.(\d+)\.")
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64 if kind == "sd1" else 96,
        "in_channels": shape(u + "input_blocks.0.0.weight")[1],
        "out_channels": shape(u + "out.2.weight")[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "cross_attention_dim": shape(attn)[1],
        # SD 1.x: 8 heads in every attention layer; SD 2.x: 64 channels per head (diffusers' attention_head_dim
        # is the number of heads there, a historical misnomer)
        "attention_head_dim": 8 if kind == "sd1" else [c // 64 for c in block_out],
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": depth,
    }

    # VAE
    v = VAE_PREFIX
    vae_levels = _count(keys, re.escape(v) + r"encoder\.down\.(\d+)\.")
    vae_layers = _count(keys, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")
    vae_out = [shape(f"{v}encoder.down.{i}.block.{vae_layers - 1}.conv2.weight")[0] for i in range(vae_levels)]
    vae = {
        "_class_name": "AutoencoderKL",
        "in_channels": shape(v + "encoder.conv_in.weight")[1],
        "out_channels": shape(v + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * vae_levels,
        "up_block_types": ["UpDecoderBlock2D"] * vae_levels,
        "block_out_channels": vae_out,
        "layers_per_block": vae_layers,
        "latent_channels": shape(v + "decoder.conv_in.weight")[1],
        "sample_size": 512 if kind == "sd1" else 768,
        "scaling_factor": 0.18215,
    }

    # text encoder
    if kind == "sd1":
        p = CLIP_PREFIX
        vocab, width = shape(p + "embeddings.token_embedding.weight")
        text = {"hidden_size": width, "num_hidden_layers": _count(keys, re.escape(p) + r"encoder\.layers\.(\d+)\."),
                "intermediate_size": shape(p + "encoder.layers.0.mlp.fc1.weight")[0],
                "max_position_embeddings": shape(p + "embeddings.position_embedding.weight")[0],
                "hidden_act": "quick_gelu"}
    else:
        p = OPEN_CLIP_PREFIX
        vocab, width = shape(p + "token_embedding.weight")
        # the last resblock is unused (SD 2.x conditions on the penultimate layer)
        text = {"hidden_size": width,
                "num_hidden_layers": _count(keys, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - 1,
                "intermediate_size": shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0],
                "max_position_embeddings": shape(p + "positional_embedding")[0],
                "hidden_act": "gelu"}
    text.update({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
                 "num_attention_heads": width // 64, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
                 "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": width,
                 "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02})
    return {"unet": unet, "vae": vae, "text_encoder": text}


# The noise schedule every SD 1.x / 2.x model was trained with, and the sampler it ships with (PLMS):
# the scheduler_config.json of SD 1.5 in diffusers' layout.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "skip_prk_steps": True, "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
}


# ---------------------------------------------------------------------------------------------------------------
# ControlNet single files (the original "cldm" layout, lllyasviel's control_v11*.safetensors): the U-Net encoder's
# keys as in UNET_TABLE under "control_model.", plus
#   input_hint_block.{0, 2, ..., 2m}   the conditioning embedding's convs (the odd indices are its SiLUs):
#                                      0 = conv_in, 2(j + 1) = blocks.j, 2m = conv_out
#   zero_convs.{k}.0                   controlnet_down_blocks.{k}
#   middle_block_out.0                 controlnet_mid_block
# Some files (e.g. the SD 2.x ControlNets) hold these keys without the "control_model." prefix.

CONTROLNET_PREFIX = "control_model."


def controlnet_original_key(key: str, layers_per_block: int, hint_blocks: int) -> str:
    """The original key of a ControlNet's diffusers key `key` (hint_blocks = len(controlnet_cond_embedding.blocks))."""
    p = CONTROLNET_PREFIX
    head, _, leaf = key.rpartition(".")                          # leaf: weight / bias
    if head == "controlnet_cond_embedding.conv_in":
        return f"{p}input_hint_block.0.{leaf}"
    if head == "controlnet_cond_embedding.conv_out":
        return f"{p}input_hint_block.{2 * (hint_blocks + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", head):
        return f"{p}input_hint_block.{2 * (int(m.group(1)) + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", head):
        return f"{p}zero_convs.{m.group(1)}.0.{leaf}"
    if head == "controlnet_mid_block":
        return f"{p}middle_block_out.0.{leaf}"
    target = original_key("unet", key, Shape(layers_per_block=layers_per_block))
    return p + target.key[len(UNET_PREFIX):]


def controlnet_state(state: dict) -> dict:
    """A ControlNet single file's tensors under "control_model." (adding the prefix to a file without it);
    tensors of other models in the same file (model.diffusion_model.*, ...) are left out."""
    if any(k.startswith(CONTROLNET_PREFIX) for k in state):
        return {k: v for k, v in state.items() if k.startswith(CONTROLNET_PREFIX)}
    if "time_embed.0.weight" in state and "input_hint_block.0.weight" in state:
        return {CONTROLNET_PREFIX + k: v for k, v in state.items()}
    if "controlnet_cond_embedding.conv_in.weight" in state:
        raise ConversionError("a ControlNet file with diffusers' key names: give config= (its config.json or "
                              "folder), the shapes alone do not say it in that layout")
    found = sorted({k.split(".")[0] for k in state})[:6]
    raise ConversionError(f"not a ControlNet checkpoint: no control_model.* or input_hint_block.* keys (found "
                          f"top-level names: {', '.join(found) or 'none'})")


def controlnet_from_original(state: dict, expected, layers_per_block: int, hint_blocks: int,
                             source: str = "checkpoint") -> dict:
    """{diffusers key: array} for the ControlNet keys `expected`, from an original single file's `state`;
    one ConversionError lists the missing keys and the ones no rule uses."""
    state = controlnet_state(state)
    out, missing = {}, []
    for key in expected:
        k = controlnet_original_key(key, layers_per_block, hint_blocks)
        if k in state:
            out[key] = _kept(state[k])
        else:
            missing.append(k)
    used = {controlnet_original_key(key, layers_per_block, hint_blocks) for key in expected}
    leftover = sorted(k for k in state if k not in used)
    problems = [f"{label}: " + ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                for label, keys in (("missing", missing), ("not understood", leftover)) if keys]
    if problems:
        raise ConversionError(f"{source} does not match the ControlNet single-file layout: " + "; ".join(problems))
    return out


def infer_controlnet_config(state: dict) -> dict:
    """A ControlNet's diffusers config read off an original single file's shapes. The family follows the text
    width: 768 SD 1.x (8 heads), 1024 SD 2.x and 2048 SDXL (64 channels per head); SDXL adds text_time."""
    state = controlnet_state(state)
    keys = list(state)
    u = CONTROLNET_PREFIX

    def shape(key):
        if key not in state:
            raise ConversionError(f"cannot infer the ControlNet's configuration: key {key!r} is missing")
        return tuple(state[key].shape)

    op = re.compile(re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    down_ids = sorted(int(m.group(1)) for k in keys if (m := op.match(k)))
    n_input = _count(keys, re.escape(u) + r"input_blocks\.(\d+)\.")
    layers = down_ids[0] - 1 if down_ids else n_input - 1
    levels = n_input // (layers + 1)
    block_out, down_types, depths = [], [], []
    for b in range(levels):
        first = f"{u}input_blocks.{1 + b * (layers + 1)}"
        block_out.append(shape(f"{first}.0.out_layers.3.weight")[0])
        attention = f"{first}.1.proj_in.weight" in state
        down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        depths.append(_count(keys, re.escape(f"{first}.1.") + r"transformer_blocks\.(\d+)\.") if attention else 1)
    attn = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    if attn is None or proj_in is None:
        raise ConversionError("cannot infer the ControlNet's configuration: it has no cross-attention layers")
    cross = shape(attn)[1]
    n_hint = _count(keys, re.escape(u) + r"input_hint_block\.(\d+)\.")      # the last conv's index + 1
    hint_levels = (n_hint - 1) // 4 + 1                                     # convs 0, 2, ..., 4(L-1)+2
    hint_channels = [shape(f"{u}input_hint_block.0.weight")[0]] + \
        [shape(f"{u}input_hint_block.{4 * m}.weight")[0] for m in range(1, hint_levels)]
    config = {
        "_class_name": "ControlNetModel",
        "in_channels": shape(u + "input_blocks.0.0.weight")[1],
        "conditioning_channels": shape(u + "input_hint_block.0.weight")[1],
        "down_block_types": down_types,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": 8 if cross == 768 else [c // 64 for c in block_out],
        "use_linear_projection": len(shape(proj_in)) == 2,
        "transformer_layers_per_block": depths,
        "conditioning_embedding_out_channels": hint_channels,
    }
    if u + "label_emb.0.0.weight" in state:                                  # SDXL's added embedding
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shape(u + "label_emb.0.0.weight")[1])
    return config


# FLUX.1 single files: the transformer under the reference repository's names (black-forest-labs/flux,
# flux1-dev.safetensors / flux1-schnell.safetensors; ComfyUI's copies put "model.diffusion_model." in front).
#
#     time_in / guidance_in / vector_in .in_layer, .out_layer     the time, guidance and pooled-text MLPs
#     img_in, txt_in                                               x_embedder, context_embedder
#     double_blocks.{i}.img_mod.lin, .txt_mod.lin                  norm1.linear, norm1_context.linear
#     double_blocks.{i}.img_attn.qkv (3D, D)                       to_q, to_k, to_v: rows [0, D), [D, 2D), [2D, 3D)
#     double_blocks.{i}.img_attn.norm.query_norm.scale             attn.norm_q.weight (RMS scales are "scale")
#     double_blocks.{i}.img_attn.proj, .img_mlp.0, .img_mlp.2      attn.to_out.0, ff.net.0.proj, ff.net.2
#     (txt_* likewise: add_q/k/v_proj, norm_added_q/k, to_add_out, ff_context)
#     single_blocks.{i}.linear1 (3D + 4D, D)                       to_q, to_k, to_v, proj_mlp (rows in that order)
#     single_blocks.{i}.linear2, .modulation.lin, .norm.*_norm     proj_out, norm.linear, attn.norm_q / norm_k
#     final_layer.linear, final_layer.adaLN_modulation.1           proj_out, norm_out.linear ([shift; scale] in the
#                                                                  file, [scale; shift] in diffusers: halves swapped)

FLUX_FILE_PREFIX = "model.diffusion_model."
FLUX_TOP = [
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),
]
# (diffusers module in a block, original module, which D-row chunk of a fused matrix or None)
FLUX_DOUBLE = [
    ("norm1.linear", "img_mod.lin", None), ("norm1_context.linear", "txt_mod.lin", None),
    ("attn.to_q", "img_attn.qkv", 0), ("attn.to_k", "img_attn.qkv", 1), ("attn.to_v", "img_attn.qkv", 2),
    ("attn.add_q_proj", "txt_attn.qkv", 0), ("attn.add_k_proj", "txt_attn.qkv", 1),
    ("attn.add_v_proj", "txt_attn.qkv", 2),
    ("attn.norm_q", "img_attn.norm.query_norm", None), ("attn.norm_k", "img_attn.norm.key_norm", None),
    ("attn.norm_added_q", "txt_attn.norm.query_norm", None), ("attn.norm_added_k", "txt_attn.norm.key_norm", None),
    ("attn.to_out.0", "img_attn.proj", None), ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None), ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None), ("ff_context.net.2", "txt_mlp.2", None),
]
FLUX_SINGLE = [
    ("norm.linear", "modulation.lin", None), ("attn.to_q", "linear1", 0), ("attn.to_k", "linear1", 1),
    ("attn.to_v", "linear1", 2), ("proj_mlp", "linear1", 3), ("attn.norm_q", "norm.query_norm", None),
    ("attn.norm_k", "norm.key_norm", None), ("proj_out", "linear2", None),
]


def is_flux(keys) -> bool:
    """True when the keys hold a FLUX transformer under the reference names (double_blocks.*.img_attn.qkv)."""
    return any(".img_attn.qkv." in k and "double_blocks." in k for k in keys)


def flux_key(key: str, dim: int):
    """(original key, rows, swap_halves) for FluxTransformer2DModel key `key` (model width D = `dim`): rows is
    the (start, stop) of the fused matrix's rows that hold it, or None."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        kind, i, module, leaf = m.group(1), m.group(2), m.group(3), m.group(4)
        table, block = (FLUX_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (FLUX_SINGLE,
                                                                                            "single_blocks")
        for new, old, chunk in table:
            if module == new:
                leaf = "scale" if old.endswith("_norm") else leaf
                rows = None if chunk is None else (chunk * dim, None if chunk == 3 else (chunk + 1) * dim)
                return f"{block}.{i}.{old}.{leaf}", rows, False
    else:
        for new, old in FLUX_TOP:
            if key.startswith(new + "."):
                return old + key[len(new):], None, new == "norm_out.linear"
    raise ConversionError(f"no rule in refldm/checkpoints/convert.py maps FLUX transformer key {key!r} to an "
                          "original checkpoint key")


def flux_from_original(state: dict, expected, dim: int, source: str = "checkpoint") -> dict:
    """Rename a FLUX single file's tensors to diffusers keys ({key: array}) for the keys `expected` of a model of
    width `dim`; with or without the "model.diffusion_model." prefix. Memory-mapped tensors (weights_dtype=
    "stored") stay mapped where only rows are taken. One ConversionError lists every missing or unused key."""
    if any(k.startswith(FLUX_FILE_PREFIX) for k in state):
        state = {k[len(FLUX_FILE_PREFIX):]: v for k, v in state.items() if k.startswith(FLUX_FILE_PREFIX)}
    out, used, missing = {}, set(), []
    for key in expected:
        old, rows, swap = flux_key(key, dim)
        if old not in state:
            missing.append(old)
            continue
        value = state[old] if hasattr(state[old], "bind") else np.asarray(state[old])
        if rows is not None:
            value = value[rows[0]:rows[1]]
        elif swap:
            value = _swap_halves(np.asarray(value))
        out[key] = value
        used.add(old)
    leftover = sorted(k for k in state if k not in used)
    problems = [f"{label}: " + ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                for label, keys in (("missing", sorted(set(missing))), ("not understood", leftover)) if keys]
    if problems:
        raise ConversionError(f"{source} does not match the FLUX single-file layout of the given config: "
                              + "; ".join(problems))
    return out


def flux_to_original(state: dict, dim: int) -> dict:
    """The inverse of `flux_from_original` (the tests write a reference-layout file from a diffusers model)."""
    out, fused = {}, {}
    for key, value in state.items():
        old, rows, swap = flux_key(key, dim)
        value = np.asarray(value)
        if rows is not None:
            fused.setdefault(old, {})[rows[0]] = value
        else:
            out[old] = _swap_halves(value) if swap else value
    for old, parts in fused.items():
        out[old] = np.concatenate([parts[k] for k in sorted(parts)], axis=0)
    return out


def flux_config_from_shapes(state: dict) -> dict:
    """A FluxTransformer2DModel config read off a single file's shapes (heads of 128 and RoPE axes (16, 56, 56),
    as in FLUX.1 dev and schnell; those two the shapes do not tell)."""
    keys = [k[len(FLUX_FILE_PREFIX):] if k.startswith(FLUX_FILE_PREFIX) else k for k in state]
    shapes = {k: tuple(v.shape) for k, v in zip(keys, state.values())}
    try:
        dim, in_channels = shapes["img_in.weight"]
        joint = shapes["txt_in.weight"][1]
        pooled = shapes["vector_in.in_layer.weight"][1]
    except KeyError as e:
        raise ConversionError(f"not a FLUX single file: no {e.args[0]}") from None
    return dict(patch_size=1, in_channels=in_channels, num_layers=_count(keys, r"double_blocks\.(\d+)\."),
                num_single_layers=_count(keys, r"single_blocks\.(\d+)\."), attention_head_dim=128,
                num_attention_heads=dim // 128, joint_attention_dim=joint, pooled_projection_dim=pooled,
                guidance_embeds="guidance_in.in_layer.weight" in shapes, axes_dims_rope=[16, 56, 56])
