"""Tiny random-weight models of every Stable Diffusion architecture, built by refldm alone (NumPy, no download).

    from refldm.crosscheck.tiny import build
    build("sd15", "tiny-sd15")          # a diffusers folder: model_index.json, unet/, vae/, text_encoder/, ...

The kinds (``KINDS``) follow the real architectures at a toy width:

    sd15          SD 1.x: U-Net with 1x1-conv proj_in/out, 2 heads, quick_gelu CLIP text encoder, epsilon
    sd2-v         SD 2.x 768-v: linear proj_in/out, heads per level, gelu text encoder padding with "!", v-prediction
    sdxl          SDXL base: two text encoders (the second with a projection), "text_time" added conditions
    sdxl-refiner  SDXL refiner: the second text encoder only, 5 time ids (aesthetic score)
    inpaint       SD 1.x inpainting: a U-Net of 9 input channels (latents, mask, masked-image latents)

Every weight comes from NumPy's PCG64 at a fixed seed per part, in the order the refldm model declares its
keys: a matrix or kernel W ~ N(0, 1/fan_in), a norm's scale 1 + 0.1 N(0, 1), every other vector 0.1 N(0, 1).
They are stored as float32 (as real checkpoints are), so the same command writes the same bytes anywhere.
The tokenizer is a CLIP byte-level BPE vocabulary (the 512 byte symbols, merges for a few dozen words, the
two special tokens): every string tokenizes, most words as single bytes.

The folders load in refldm (`StableDiffusionPipeline.from_pretrained`) and in diffusers / transformers alike.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from refldm.checkpoints.weights import save_file

__all__ = ["KINDS", "build", "configs", "random_state", "tokenizer_files", "SEED"]

SEED = 20240624  # the fixed seed every tiny model derives from
KINDS = ("sd15", "sd2-v", "sdxl", "sdxl-refiner", "inpaint")

# words with their own merges (the rest of any text tokenizes byte by byte)
WORDS = ("a photo of an astronaut riding horse on the moon red blue green circle square cat dog white black "
         "background small large painting by oil portrait city night").split()


# ---------------------------------------------------------------------------------------------------
# Configs


def _text_config(width, layers, heads, inter, act, vocab, eos, projection=None):
    config = {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
              "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": width,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5, "bos_token_id": eos - 1,
              "eos_token_id": eos, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
              "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": projection or width}
    return config


def _vae_config(xl=False):
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [8, 16, 16], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "norm_num_groups": 4, "act_fn": "silu", "sample_size": 32,
            "scaling_factor": 0.13025 if xl else 0.18215, "force_upcast": True}


def _scheduler_config(kind):
    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    if kind.startswith("sdxl"):
        return {"_class_name": "EulerDiscreteScheduler", **base, "interpolation_type": "linear",
                "use_karras_sigmas": False}
    cfg = {"_class_name": "DDIMScheduler", **base, "clip_sample": False, "set_alpha_to_one": False}
    if kind == "sd2-v":
        cfg["prediction_type"] = "v_prediction"
    return cfg


def configs(kind: str, vocab_size: int) -> dict:
    """{part: config dict} of a tiny model of `kind` (see the module docstring); `vocab_size` of its tokenizer."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(KINDS)}")
    eos = vocab_size - 1
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": 4, "in_channels": 9 if kind == "inpaint" else 4,
            "out_channels": 4, "layers_per_block": 1, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
            "cross_attention_dim": 16, "use_linear_projection": False, "act_fn": "silu", "norm_eps": 1e-5,
            "flip_sin_to_cos": True, "freq_shift": 0}
    out = {"scheduler": _scheduler_config(kind)}
    if kind in ("sd15", "inpaint"):
        out["text_encoder"] = _text_config(16, 2, 2, 24, "quick_gelu", vocab_size, eos)
        out["unet"] = unet
        out["vae"] = _vae_config()
    elif kind == "sd2-v":
        out["text_encoder"] = _text_config(16, 2, 2, 24, "gelu", vocab_size, eos)
        unet.update(attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True)
        out["unet"] = unet
        out["vae"] = _vae_config()
    else:  # SDXL base and refiner: down/up blocks as SDXL's (attention in the deeper level), text_time
        refiner = kind == "sdxl-refiner"
        n_ids, proj, time_dim = (5 if refiner else 6), 12, 4
        unet.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 2],
                    transformer_layers_per_block=[1, 2], use_linear_projection=True,
                    cross_attention_dim=16 if refiner else 8 + 16, addition_embed_type="text_time",
                    addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=proj + n_ids * time_dim)
        out["unet"] = unet
        out["vae"] = _vae_config(xl=True)
        if not refiner:
            out["text_encoder"] = _text_config(8, 2, 2, 16, "quick_gelu", vocab_size, eos)
        out["text_encoder_2"] = _text_config(16, 2, 2, 24, "gelu", vocab_size, eos, projection=proj)
    return out


# ---------------------------------------------------------------------------------------------------
# Weights


def _part_seed(kind: str, part: str) -> int:
    return (SEED + zlib.crc32(f"{kind}/{part}".encode())) % 2**32


def random_state(model, seed: int) -> dict:
    """{key: float32 array} for every key `model` declares, drawn in declaration order (module docstring)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, _, _, value in model.params():
        shape = tuple(value.shape)
        if len(shape) >= 2:
            w = rng.standard_normal(shape) / np.sqrt(float(np.prod(shape[1:])))
        elif "norm" in key and key.endswith("weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.1 * rng.standard_normal(shape)
        state[key] = w.astype(np.float32)
    return state


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_files(pad_token: str = "<|endoftext|>") -> dict:
    """{file name: text} of a tiny CLIP tokenizer folder (vocab.json, merges.txt, configs)."""
    from refldm.models.tokenizer import clip_vocab
    merges = []
    for w in WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:
            pair = (syms[0], syms[1])
            if pair not in merges:
                merges.append(pair)
            syms = [syms[0] + syms[1]] + syms[2:]
    vocab = clip_vocab(merges)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False, sort_keys=True),
            "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
            "tokenizer_config.json": json.dumps(config, sort_keys=True, indent=1),
            "special_tokens_map.json": json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")}, sort_keys=True, indent=1)}


def _write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _json(path, obj):
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# The folder


def build(kind: str, folder) -> str:
    """Write the tiny model `kind` as a diffusers folder at `folder` (created); return its path.

    Also writes ``original.safetensors`` beside the parts: the same weights under the original (LDM /
    single-file) key names (`refldm.checkpoints.convert.to_original`).
    """
    from refldm.models.clip import CLIPTextModel, CLIPTextModelWithProjection
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(KINDS)}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    xl = kind.startswith("sdxl")
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"} if xl else \
        {"tokenizer": "!" if kind == "sd2-v" else "<|endoftext|>"}
    if kind == "sdxl-refiner":
        pads.pop("tokenizer")
    vocab_size = None
    for tok, pad in pads.items():
        os.makedirs(os.path.join(folder, tok), exist_ok=True)
        files = tokenizer_files(pad)
        for name, text in files.items():
            _write_text(os.path.join(folder, tok, name), text)
        vocab_size = len(json.loads(files["vocab.json"]))
    cfgs = configs(kind, vocab_size)
    classes = {"unet": (UNet2DConditionModel, "diffusion_pytorch_model", "diffusers", "UNet2DConditionModel"),
               "vae": (AutoencoderKL, "diffusion_pytorch_model", "diffusers", "AutoencoderKL"),
               "text_encoder": (CLIPTextModel, "model", "transformers", "CLIPTextModel"),
               "text_encoder_2": (CLIPTextModelWithProjection, "model", "transformers",
                                  "CLIPTextModelWithProjection")}
    states = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if part not in cfgs:
            continue
        cls, stem, _, _ = classes[part]
        model = cls.from_config(cfgs[part])
        state = random_state(model, _part_seed(kind, part))
        states[part] = state
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        _json(os.path.join(folder, part, "config.json"), cfgs[part])
        stored = state if part.startswith("unet") or part == "vae" else \
            {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in state.items()}
        save_file(stored, os.path.join(folder, part, f"{stem}.safetensors"), {"format": "pt"})
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"), cfgs["scheduler"])
    index = {"_class_name": {"sd15": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
                             "inpaint": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLPipeline",
                             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}[kind],
             "_diffusers_version": "0.30.0", "scheduler": ["diffusers", cfgs["scheduler"]["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for part in ("text_encoder", "text_encoder_2"):
        if part in cfgs:
            index[part] = ["transformers", classes[part][3]]
            index[part.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        elif xl:
            index[part] = [None, None]
            index[part.replace("text_encoder", "tokenizer")] = [None, None]
    if xl:
        index.update(force_zeros_for_empty_prompt=kind == "sdxl", add_watermarker=False)
        if kind == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    _json(os.path.join(folder, "model_index.json"), index)
    save_file(original_state(kind, states, cfgs), os.path.join(folder, "original.safetensors"), {"format": "pt"})
    return folder


def original_state(kind: str, states: dict, cfgs: dict) -> dict:
    """{original single-file key: array} of the parts' {diffusers key: array} (`convert.to_original`)."""
    from refldm.checkpoints import convert
    layout = "sdxl" if kind.startswith("sdxl") else ("sd2" if kind == "sd2-v" else "sd1")
    out = convert.to_original(states, cfgs, layout)
    if kind == "sdxl-refiner":  # the refiner's only text encoder is embedder 0 in its single file
        out = {k.replace(convert.XL_OPEN_CLIP_PREFIX, "conditioner.embedders.0.model.", 1): v for k, v in out.items()}
    return out
