"""Tiny random-weight models of every Stable Diffusion architecture, built by refldm alone (NumPy, no download).

    from refldm.crosscheck.tiny import build
    build("sd15", "tiny-sd15")          # a diffusers folder: model_index.json, unet/, vae/, text_encoder/, ...

The kinds (``KINDS``) follow the real architectures at a toy width:

    sd15          SD 1.x: U-Net with 1x1-conv proj_in/out, 2 heads, quick_gelu CLIP text encoder, epsilon
    sd2-v         SD 2.x 768-v: linear proj_in/out, heads per level, gelu text encoder padding with "!", v-prediction
    sdxl          SDXL base: two text encoders (the second with a projection), "text_time" added conditions
    sdxl-refiner  SDXL refiner: the second text encoder only, 5 time ids (aesthetic score)
    inpaint       SD 1.x inpainting: a U-Net of 9 input channels (latents, mask, masked-image latents)
    sd3           SD3 / SD3.5: an MMDiT with SD3.5's RMS qk-norm and one MMDiT-X (dual attention) block, two CLIP
                  encoders with projections (the second padding with "!"), a T5 encoder with a unigram tokenizer,
                  the 16-channel VAE without quant convs, FlowMatchEulerDiscreteScheduler with shift 3
    flux          FLUX.1-dev: a double-stream and two single-stream blocks with a 3-axis RoPE and the guidance
                  embedding, CLIP-L (pooled) and T5, the 16-channel VAE, flow matching with dynamic shifting

Every weight comes from NumPy's PCG64 at a fixed seed per part, in the order the refldm model declares its
keys: a matrix or kernel W ~ N(0, 1/fan_in), a norm's scale 1 + 0.1 N(0, 1), every other vector 0.1 N(0, 1).
They are stored as float32 (as real checkpoints are), so the same command writes the same bytes anywhere.
The tokenizer is a CLIP byte-level BPE vocabulary (the 512 byte symbols, merges for a few dozen words, the
two special tokens): every string tokenizes, most words as single bytes. The T5 tokenizer (sd3, flux) is a
SentencePiece unigram tokenizer.json over the same words, single letters, digits and punctuation; other
characters are <unk>.

The folders load in refldm (`StableDiffusionPipeline.from_pretrained`) and in diffusers / transformers alike.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from refldm.checkpoints.weights import save_file

__all__ = ["KINDS", "FLOW_KINDS", "build", "configs", "random_state", "tokenizer_files", "t5_tokenizer_files", "SEED"]

SEED = 20240624  # the fixed seed every tiny model derives from
KINDS = ("sd15", "sd2-v", "sdxl", "sdxl-refiner", "inpaint", "sd3", "flux")
FLOW_KINDS = ("sd3", "flux")  # the rectified-flow transformers

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
    if kind in FLOW_KINDS:
        return _flow_configs(kind, vocab_size)
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


def _vae16_config(scaling, shift):
    """The 16-channel VAE of SD3 and FLUX at a toy width: no quant convs, a shift_factor."""
    cfg = _vae_config()
    cfg.update(latent_channels=16, scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True)
    return cfg


def _t5_config(d_model, d_kv, heads, vocab):
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": d_model,
            "d_kv": d_kv, "d_ff": 24, "num_layers": 2, "num_heads": heads, "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20, "layer_norm_epsilon": 1e-6,
            "dropout_rate": 0.0, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "initializer_factor": 1.0, "tie_word_embeddings": False}


def _flow_configs(kind: str, vocab_size: int) -> dict:
    """SD3 and FLUX at a toy width (the module docstring); vocab_size: the CLIP tokenizer's."""
    eos = vocab_size - 1
    t5_vocab = len(_t5_vocab())
    if kind == "sd3":
        return {"transformer": {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2,
                                "in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                                "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 24,
                                "out_channels": 16, "pos_embed_max_size": 12, "qk_norm": "rms_norm",
                                "dual_attention_layers": [0]},
                "vae": _vae16_config(1.5305, 0.0609),
                "text_encoder": _text_config(12, 2, 2, 20, "quick_gelu", vocab_size, eos, projection=12),
                "text_encoder_2": _text_config(16, 3, 2, 20, "gelu", vocab_size, eos, projection=12),
                "text_encoder_3": _t5_config(32, 8, 2, t5_vocab),
                "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                              "shift": 3.0}}
    return {"transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                            "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                            "joint_attention_dim": 16, "pooled_projection_dim": 12, "guidance_embeds": True,
                            "axes_dims_rope": [2, 4, 2]},
            "vae": _vae16_config(0.3611, 0.1159),
            "text_encoder": _text_config(12, 2, 2, 20, "quick_gelu", vocab_size, eos),
            "text_encoder_2": _t5_config(16, 4, 4, t5_vocab),
            "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                          "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                          "base_image_seq_len": 256, "max_image_seq_len": 4096}}


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


T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def _t5_vocab() -> list:
    """[piece, score] of the tiny unigram model: the specials, whole words, letters and digits with and without
    the word-start mark, punctuation (scores: longer pieces likelier, so words win over their letters)."""
    vocab = [[t, 0.0] for t in T5_SPECIALS] + [["\u2581", -2.0]]
    vocab += [["\u2581" + w, -1.0 - i / 100] for i, w in enumerate(WORDS)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab += [["\u2581" + c, -4.0 - i / 100] for i, c in enumerate(chars) if c not in WORDS]
    vocab += [[c, -5.0 - i / 100] for i, c in enumerate(chars + ".,!?'()-:;")]
    return vocab


def t5_tokenizer_files() -> dict:
    """{file name: text} of a tiny T5 tokenizer folder: a unigram tokenizer.json (no normaliser, the Metaspace
    pre-tokenizer, </s> appended) and tokenizer_config.json; ids <pad> 0, </s> 1, <unk> 2."""
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, t in enumerate(T5_SPECIALS)],
            "normalizer": None, "pre_tokenizer": meta,
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 0}},
                                        {"Sequence": {"id": "B", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                               "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
            "decoder": meta, "model": {"type": "Unigram", "unk_id": 2, "vocab": _t5_vocab(), "byte_fallback": False}}
    config = {"tokenizer_class": "T5TokenizerFast", "model_max_length": 512, "extra_ids": 0, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    return {"tokenizer.json": json.dumps(data, ensure_ascii=False, sort_keys=True, indent=1),
            "tokenizer_config.json": json.dumps(config, sort_keys=True, indent=1),
            "special_tokens_map.json": json.dumps({k: config[k] for k in ("eos_token", "pad_token", "unk_token")},
                                                  sort_keys=True, indent=1)}


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
    if kind in FLOW_KINDS:
        return _build_flow(kind, folder)
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


def _build_flow(kind: str, folder: str) -> str:
    """`build` for SD3 and FLUX: diffusers' folder layout of StableDiffusion3Pipeline / FluxPipeline, and
    original.safetensors (SD3: the single-file layout, `convert.sd3_to_original`; FLUX: the transformer under
    Black Forest Labs' names, `convert.flux_to_original`)."""
    from refldm.checkpoints import convert
    from refldm.models.clip import CLIPTextModel, CLIPTextModelWithProjection
    from refldm.models.flux_transformer import FluxTransformer2DModel
    from refldm.models.sd3_transformer import SD3Transformer2DModel
    from refldm.models.t5 import T5EncoderModel
    from refldm.models.vae import AutoencoderKL

    clip = {"tokenizer": "<|endoftext|>"}
    if kind == "sd3":
        clip["tokenizer_2"] = "!"
    vocab_size = None
    for tok, pad in clip.items():
        os.makedirs(os.path.join(folder, tok), exist_ok=True)
        files = tokenizer_files(pad)
        for name, text in files.items():
            _write_text(os.path.join(folder, tok, name), text)
        vocab_size = len(json.loads(files["vocab.json"]))
    t5 = "text_encoder_3" if kind == "sd3" else "text_encoder_2"
    t5_tok = t5.replace("text_encoder", "tokenizer")
    os.makedirs(os.path.join(folder, t5_tok), exist_ok=True)
    for name, text in t5_tokenizer_files().items():
        _write_text(os.path.join(folder, t5_tok, name), text)
    cfgs = _flow_configs(kind, vocab_size)
    transformer = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    classes = {"transformer": (transformer, "diffusion_pytorch_model", "diffusers"),
               "vae": (AutoencoderKL, "diffusion_pytorch_model", "diffusers"),
               "text_encoder": (CLIPTextModelWithProjection if kind == "sd3" else CLIPTextModel, "model",
                                "transformers"),
               "text_encoder_2": (CLIPTextModelWithProjection, "model", "transformers"),
               t5: (T5EncoderModel, "model", "transformers")}
    states = {}
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if part not in cfgs:
            continue
        cls, stem, _ = classes[part]
        model = cls.from_config(cfgs[part])
        state = random_state(model, _part_seed(kind, part))
        if part == t5:  # one embedding table, tied: encoder.embed_tokens holds the same values as shared
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
        states[part] = state
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        _json(os.path.join(folder, part, "config.json"), cfgs[part])
        clip_part = part.startswith("text_encoder") and part != t5
        stored = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in state.items()} \
            if clip_part else state
        save_file(stored, os.path.join(folder, part, f"{stem}.safetensors"), {"format": "pt"})
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"), cfgs["scheduler"])
    index = {"_class_name": "StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline",
             "_diffusers_version": "0.30.0", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", transformer.__name__], "vae": ["diffusers", "AutoencoderKL"]}
    for part, (cls, _, lib) in classes.items():
        if part.startswith("text_encoder") and part in cfgs:
            index[part] = [lib, cls.__name__]
            index[part.replace("text_encoder", "tokenizer")] = \
                ["transformers", "T5TokenizerFast" if part == t5 else "CLIPTokenizer"]
    _json(os.path.join(folder, "model_index.json"), index)
    if kind == "sd3":
        original = convert.sd3_to_original(states, cfgs)
    else:
        dim = cfgs["transformer"]["num_attention_heads"] * cfgs["transformer"]["attention_head_dim"]
        original = convert.flux_to_original(states["transformer"], dim)
    save_file(original, os.path.join(folder, "original.safetensors"), {"format": "pt"})
    return folder
