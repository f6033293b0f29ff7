"""Conformance vectors of the rectified-flow transformers: Stable Diffusion 3 / 3.5 and FLUX.1.

`refldm.crosscheck.vectors.generate` hands a model folder whose transformer is an ``SD3Transformer2DModel`` or
a ``FluxTransformer2DModel`` to `generate_flow`, which writes the same kind of bundle (manifest.json, one
safetensors file per part, cases named ``<group>/<layer>`` after diffusers' / transformers' ``named_modules()``)
with the parts of these models, in data-flow order:

    tokenizer      CLIP's ids and masks (77), T5's ids and masks (max_sequence_length; </s> then <pad>)
    text_encoder   CLIP-L / CLIP-G: every layer, the penultimate state, the pooled output; T5: every layer
                   (block, attention, gated-GELU feed-forward, RMS norms), last_hidden_state
    vae            the 16-channel VAE's encoder and decoder (no quant convs), every module
    transformer    one call per timestep, cond and uncond: the timestep sinusoid (time_text_embed.time_proj),
                   FLUX's RoPE table (pos_embed: cos, and pos_embed.sin), the patch / token embeddings, every
                   joint (double-stream) and single-stream block and every module inside, the output
    scheduler      the flow schedulers' t and sigma tables, and step() on fixed velocities
    noise          the seed streams, in the 16-channel latent's shape
    pipeline       the latents after each step and the decoded image (FLUX: packed latents (1, N, 64))

The transformer's inputs are the golden outputs of the text encoders, assembled as the pipelines do: SD3's
context is [pad(CLIP-L penultimate ++ CLIP-G penultimate, to joint_attention_dim); T5 states] along the
sequence (zeros for T5 when the folder has none) and its pooled vector CLIP-L's ++ CLIP-G's text_embeds; FLUX's
context is T5's last hidden state, its pooled vector CLIP-L's pooler output, its time t / 1000 in [0, 1], with
the RoPE ids (txt_ids zeros, img_ids (0, row, column)) and the guidance value 3.5 as inputs.
docs/porting.md walks a port through them. The functions that run or write groups take `kit`, the module
refldm.crosscheck.vectors (which imports this one), for its shared runners and constants.
"""

from __future__ import annotations

import numpy as np

from refldm import backend

__all__ = ["FLOW_SAMPLERS", "FLOW_PIPELINE_SAMPLERS", "generate_flow", "run_transformer", "t5_length"]

# flow samplers by name ("|key=value" adds a scheduler option); FLUX sets its t grid as its pipeline does
FLOW_SAMPLERS = {"sd3": ("euler", "euler|use_karras_sigmas=true", "euler|use_exponential_sigmas=true", "heun",
                         "dpm++2m"),
                 "flux": ("euler", "euler|use_karras_sigmas=true")}
FLOW_PIPELINE_SAMPLERS = {"sd3": ("euler", "dpm++2m"), "flux": ("euler",)}
GUIDANCE = {"sd3": 7.0, "flux": 3.5}      # the pipelines' defaults (FLUX: the guidance embedding's value)
PIPELINE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


def t5_length(family: str, tiny: bool) -> int:
    """T5's token count in a bundle: the pipeline's default, 32 for a tiny model (small bundles)."""
    return 32 if tiny else PIPELINE_LENGTH[family]


# ---------------------------------------------------------------------------------------------------
# Loading


def load_part(models, part: str, path: str):
    """The refldm model (or T5 tokenizer) of `part` of an SD3 / FLUX folder, in models.dtype."""
    if part == "transformer":
        if models.family == "sd3":
            from refldm.models.sd3_transformer import SD3Transformer2DModel as cls
        else:
            from refldm.models.flux_transformer import FluxTransformer2DModel as cls
    elif models.is_t5(part) and part.startswith("tokenizer"):
        from refldm.models.t5_tokenizer import T5TokenizerFast
        return T5TokenizerFast.from_pretrained(path)
    elif models.is_t5(part):
        from refldm.models.t5 import T5EncoderModel as cls
    elif models.family == "sd3":
        from refldm.models.clip import CLIPTextModelWithProjection as cls
    else:
        from refldm.models.clip import CLIPTextModel as cls
    return cls.from_pretrained(path, dtype=models.dtype)


def load_pipeline(models):
    if models.family == "sd3":
        from refldm.pipelines.sd3 import StableDiffusion3Pipeline as cls
    else:
        from refldm.pipelines.flux import FluxPipeline as cls
    return cls.from_pretrained(models.folder, dtype=models.dtype)


# ---------------------------------------------------------------------------------------------------
# Original key prefixes: SD3's single file (model.diffusion_model.joint_blocks.*, text_encoders.*), FLUX's
# reference names (double_blocks.*, single_blocks.*) and its ae.safetensors (the LDM VAE names, no prefix)


def _original_key(info: dict, part: str, key: str):
    """(original key, note on the rows it occupies or None) of diffusers key `key`, or None."""
    from refldm.checkpoints import convert
    try:
        if info["family"] == "sd3":
            if part not in convert.SD3_PREFIXES:
                return None
            t = convert._sd3_target(part, key, info["configs"])
            return t.key, None if t.third is None else f"{t.third}/3 of the rows"
        if part == "transformer":
            cfg = info["configs"]["transformer"]
            dim = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
            old, rows, _ = convert.flux_key(key, dim)
            return old, None if rows is None else f"rows {rows[0]}:{'' if rows[1] is None else rows[1]}"
        if part == "vae":
            shape = convert.Shape(vae_levels=len(info["configs"]["vae"].get("block_out_channels", ())))
            t = convert.original_key("vae", key, shape)
            return t.key.removeprefix(convert.VAE_PREFIX), None
    except (convert.ConversionError, KeyError):
        return None
    return None


def shared_key_prefix(keys) -> str:
    """The longest run of dotted components that every key starts with, never a whole key's last component
    ("a.b.c.weight", "a.b.d.bias" -> "a.b"); "" for no keys. The prefix of a container module in the
    original layout, from the original keys of the tensors below it (here and in `vectors.original_prefix`)."""
    split = [k.split(".") for k in keys]
    if not split:
        return ""
    common = split[0][:-1]
    for parts in split[1:]:
        n = 0
        while n < min(len(common), len(parts) - 1) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def original_prefix(info: dict, part: str, layer: str, keys=()) -> str:
    """The original key prefix of module `layer` of network `part` ("" when none maps): a module with weights
    maps directly, a container to the longest prefix shared by the original keys below it."""
    if not layer:
        return ""
    got = _original_key(info, part, layer + ".weight") or _original_key(info, part, layer + ".scale")
    if got and got[1] is None:
        return got[0].rsplit(".", 1)[0]
    if got:
        return f"{got[0].rsplit('.', 1)[0]}[{got[1]}]"
    below = [_original_key(info, part, k) for k in keys if k.startswith(layer + ".")]
    joined = shared_key_prefix([b[0] for b in below if b])
    if not joined:
        return ""
    from refldm.checkpoints import convert
    network = convert.SD3_PREFIXES.get(part, "").rstrip(".") if info["family"] == "sd3" else ""
    return "" if len(joined) <= len(network) else joined


# ---------------------------------------------------------------------------------------------------
# Runners


def run_transformer(kit, models, group, inputs):
    """One transformer call on the group's inputs: the time sinusoid, (FLUX) the RoPE table, every module, the
    output."""
    from refldm.core import functional as F
    model = models.get("transformer")
    dt = models.dtype
    x = backend.asarray(inputs["hidden_states"], dtype=dt)
    c = backend.asarray(inputs["encoder_hidden_states"], dtype=dt)
    y = backend.asarray(inputs["pooled_projections"], dtype=dt)
    t = np.asarray(inputs["timestep"], dtype=np.float64)
    first = {}
    if models.family == "sd3":
        acts, out = kit._record(lambda: model(x, c, y, t.astype(dt)))
        scaled = backend.asarray(t.astype(dt))
    else:
        from refldm.models.flux_transformer import rope
        img_ids, txt_ids = np.asarray(inputs["img_ids"]), np.asarray(inputs["txt_ids"])
        g = np.asarray(inputs["guidance"], dtype=dt) if "guidance" in inputs else None
        acts, out = kit._record(lambda: model(x, c, y, t.astype(dt), img_ids, txt_ids, guidance=g))
        scaled = backend.asarray(t.astype(dt) * np.asarray(1000, dtype=dt))   # the model multiplies by 1000
        cos, sin = rope(np.concatenate([txt_ids, img_ids], axis=0), model.config.axes_dims_rope)
        first["pos_embed"], first["pos_embed.sin"] = cos.astype(dt), sin.astype(dt)
        for name in acts:  # diffusers' FLUX normalises q and k as (B, L, H, d); refldm holds (B, H, L, d)
            if name.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                acts[name] = np.ascontiguousarray(np.swapaxes(acts[name], 1, 2))
    first = {"time_text_embed.time_proj": kit._np(F.timestep_embedding(scaled, 256, flip_sin_to_cos=True,
                                                                      downscale_freq_shift=0)), **first}
    root = acts.pop("<root>")
    first.update(acts)
    first["output"] = root
    return first


def sampler_key(kit, spec: str) -> str:
    """"euler|use_karras_sigmas=true" -> "euler_karras": a group name for a flow sampler and its options."""
    name, options = kit._sampler(spec)
    words = [name.lower().replace(" ", "_").replace("+", "p")]
    for key, value in options.items():
        short = key.removeprefix("use_").removesuffix("_sigmas")
        words.append(short if value is True else f"{short}{value}")
    return "_".join(words)


def make_flow_scheduler(kit, models, spec: str):
    """The flow version of sampler `spec` on the folder's scheduler config, as the SD3 pipeline makes it."""
    from refldm.schedulers import get_scheduler, names
    name, options = kit._sampler(spec)
    config = models.configs["scheduler"]
    cls, implied = names.resolve_flow(name)
    if implied.get("use_flow_sigmas"):  # DPM-Solver++ on the flow grid, with the folder's shift
        implied["flow_shift"] = float(config.get("shift", 1.0))
        for key in ("use_dynamic_shifting", "time_shift_type"):
            if key in config:
                implied[key] = config[key]
    return get_scheduler(cls, config, **implied, **options)


def set_flow_timesteps(sched, args: dict) -> None:
    """set_timesteps as the pipelines call it: FLUX's sigmas linspace(1, 1/n, n) with mu; SD3's n steps (mu when
    the scheduler shifts dynamically)."""
    n, mu = args["steps"], args.get("mu")
    kwargs = {} if mu is None else {"mu": mu}
    if args.get("sigmas") == "linspace":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), **kwargs)
    else:
        sched.set_timesteps(n, **kwargs)


def _flux_mu(models, latent: int):
    from refldm.schedulers.flow_match_euler import calculate_shift
    c = models.configs["scheduler"]
    if not c.get("use_dynamic_shifting"):
        return None
    return float(calculate_shift((latent // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15)))


def run_flow_pipeline(kit, models, group, inputs):
    pipe = models.pipeline()
    args = group["args"]
    noise = np.asarray(inputs["noise"], dtype=np.float64)
    common = dict(height=args["size"], width=args["size"], num_inference_steps=args["steps"],
                  guidance_scale=args["guidance_scale"], seed=0, progress=False,
                  max_sequence_length=args["max_sequence_length"])
    if models.family == "sd3":
        call = lambda: pipe(group["text"], negative_prompt="", latents=noise, sampler=args["sampler"],  # noqa: E731
                            **common)
    else:
        from refldm.models.flux_transformer import pack_latents
        call = lambda: pipe(group["text"], latents=pack_latents(noise), **common)  # noqa: E731
    acts, out = kit._record(call, include=kit.PIPELINE_NAMES)
    return kit._pipeline_cases(acts, out, args["steps"])


# ---------------------------------------------------------------------------------------------------
# Descriptions


def describe(part: str, group: dict, layer: str) -> tuple[str, str]:
    """(one-line description, docs page) of a case of an SD3 / FLUX part that the U-Net kit does not describe."""
    args = group["args"]
    if part == "tokenizer":
        what = {"input_ids": f"T5 ids: unigram pieces + </s>, padded with <pad> (id 0) to {args['max_length']}",
                "attention_mask": "1 for the pieces and </s>, 0 for padding"}[layer]
        return f"{args['tokenizer']}: {what}", "t5.md"
    if part == "text_encoder":
        if layer == "last_hidden_state":
            return "T5's final RMS norm of the last block's output: the text tokens the transformer reads", "t5.md"
        return f"{args['encoder']} (T5) module {layer}: its output (the first array of a tuple)", "t5.md"
    page = "flux.md" if args.get("family") == "flux" else "sd3.md"
    special = {"time_text_embed.time_proj": "the timestep sinusoid [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/128), "
                                            "t in [0, 1000]",
               "pos_embed": "RoPE: cos of every (text, row, column) id times the axis frequencies, each repeated "
                            "for its channel pair (S + N, head_dim); text tokens first",
               "pos_embed.sin": "RoPE: sin of the same angles (S + N, head_dim)",
               "output": "the transformer's output: the velocity v = e - x_0 predicted for this t and text"}
    if layer in special:
        return special[layer], page
    return f"transformer module {layer}: its output (blocks: the text stream, the first of diffusers' " \
           "(encoder_hidden_states, hidden_states))", page


# ---------------------------------------------------------------------------------------------------
# Generation


def generate_flow(kit, w, models, parts, prompts, size: int, steps: int, latent: int, keep, timesteps, length: int):
    """Add the SD3 / FLUX groups and cases to the bundle writer `w` (refldm.crosscheck.vectors._Writer)."""
    fam = models.family
    rng = np.random.default_rng(kit.SEED)
    text_prompts = [prompts[i] for i in kit.TEXT_PROMPTS if i < len(prompts)] or prompts[:1]
    tokens, encoded = {}, {}
    # 1. tokenizers: CLIP's (77) and T5's (length) ids and masks over the prompt suite
    for enc in models.text_encoders:
        tok = enc.replace("text_encoder", "tokenizer")
        args = {"tokenizer": tok, "t5": True, "max_length": length} if models.is_t5(enc) else {"tokenizer": tok}
        for i, p in enumerate(prompts):
            if "tokenizer" in parts:
                out = w.add("tokenizer", f"{tok}.p{i:02d}", args, {}, text=p)
            else:
                out = kit.run_tokenizer(models, {"args": args, "text": p}, {})
            tokens[(tok, p)] = out["input_ids"]
    # 2. text encoders: every layer; CLIP's penultimate and pooled outputs, T5's last hidden state
    for enc in models.text_encoders:
        tok = enc.replace("text_encoder", "tokenizer")
        args = {"encoder": enc, "t5": True} if models.is_t5(enc) else {"encoder": enc, "projection": fam == "sd3"}
        for j, p in enumerate(text_prompts):
            ids = tokens[(tok, p)]
            if "text_encoder" in parts:  # T5-XXL's every module is GBs at 256 tokens: "blocks" keeps its blocks
                out = w.add("text_encoder", f"{enc}.p{prompts.index(p):02d}", args, {"input_ids": ids}, net=enc,
                            keep=keep if models.is_t5(enc) else None)
            else:
                out = kit.run_text_encoder(models, {"args": args}, {"input_ids": ids})
            encoded[(enc, j)] = out
    # 3. the 16-channel VAE: encode the fixed image, decode its posterior mean
    if "vae" in parts:
        enc_out = w.add("vae", "vae.encode", {"direction": "encode"}, {"images": kit._test_image(size)}, keep=keep)
        w.add("vae", "vae.decode", {"direction": "decode"}, {"latents": enc_out["latent_dist.mean"]}, keep=keep)
    # 4. the transformer: every module at a few timesteps, cond and uncond
    cfg = models.configs["transformer"]
    channels = models.configs["vae"].get("latent_channels", 16)
    if "transformer" in parts:
        from refldm.models.flux_transformer import latent_image_ids, pack_latents
        sample = rng.standard_normal((1, channels, latent, latent))
        for j, cond in enumerate(("cond", "uncond")):
            j = min(j, len(text_prompts) - 1)
            if fam == "sd3":
                clip = np.concatenate([encoded[(e, j)]["penultimate_hidden_state"]
                                       for e in ("text_encoder", "text_encoder_2")], axis=-1)
                d = cfg["joint_attention_dim"]
                clip = np.concatenate([clip, np.zeros(clip.shape[:2] + (d - clip.shape[-1],))], axis=-1)
                t5 = encoded[("text_encoder_3", j)]["last_hidden_state"] if "text_encoder_3" in models.configs \
                    else np.zeros((1, length, d))
                inputs = {"hidden_states": sample, "encoder_hidden_states": np.concatenate([clip, t5], axis=1),
                          "pooled_projections": np.concatenate([encoded[(e, j)]["pooled"]
                                                                for e in ("text_encoder", "text_encoder_2")], axis=-1)}
            else:
                ctx = encoded[("text_encoder_2", j)]["last_hidden_state"]
                inputs = {"hidden_states": kit._np(pack_latents(sample)), "encoder_hidden_states": ctx,
                          "pooled_projections": encoded[("text_encoder", j)]["pooled"]}
            for t in timesteps:
                extra = {"timestep": np.asarray([float(t) if fam == "sd3" else t / 1000.0])}
                if fam == "flux":
                    extra.update(img_ids=latent_image_ids(latent // 2, latent // 2),
                                 txt_ids=np.zeros((inputs["encoder_hidden_states"].shape[1], 3), dtype=np.int64))
                    if cfg.get("guidance_embeds"):
                        extra["guidance"] = np.asarray([GUIDANCE["flux"]])
                w.add("transformer", f"transformer.t{t}.{cond}", {"timestep": t, "cond": cond, "family": fam},
                      {**inputs, **extra}, keep=keep)
    # 5. schedulers: tables for a few step counts; steps on fixed velocities
    mu = _flux_mu(models, latent) if fam == "flux" else None
    flow_args = {"mu": mu, "sigmas": "linspace"} if fam == "flux" else {}
    if "scheduler" in parts:
        shape = (1, channels, latent, latent)
        for s in FLOW_SAMPLERS[fam]:
            key = sampler_key(kit, s)
            for n in sorted({steps, *kit.TABLE_STEPS}):
                args = {"sampler": s, "steps": n, "run": n == steps, **flow_args}
                if n != steps:
                    w.add("scheduler", f"scheduler.{key}.n{n}", args, {})
                    continue
                sched = kit.make_scheduler(models, s)
                set_flow_timesteps(sched, args)
                calls = len(sched.timesteps)
                srng = np.random.default_rng(kit.SEED + 1)
                x = srng.standard_normal(shape) * float(sched.init_noise_sigma)
                vel = [srng.standard_normal(shape) for _ in range(calls)]
                inputs = {"sample.0": x, **{f"model_output.{i}": vel[i] for i in range(calls)}}
                chain = kit.run_scheduler(models, {"args": args}, inputs)
                for i in range(1, calls):
                    inputs[f"sample.{i}"] = chain[f"step{i - 1}.prev_sample"]
                w.add("scheduler", f"scheduler.{key}.n{n}", args, dict(sorted(inputs.items(), key=kit._call_order)))
    # 6. noise streams, in the latent's shape
    if "noise" in parts:
        shape = [1, channels, latent, latent]
        for s in kit.NOISE_SEEDS:
            w.add("noise", f"noise.torch.seed{s}", {"seed": s, "mode": "torch", "shape": shape},
                  {"seed": np.asarray([s], dtype=np.uint64)}, seed=s)
    # 7. the whole pipeline
    if "pipeline" in parts:
        from refldm.core.random import Generator
        noise = Generator(kit.SEED).randn((1, channels, latent, latent), dtype="float32").astype(np.float64)
        for s in FLOW_PIPELINE_SAMPLERS[fam]:
            w.add("pipeline", f"pipeline.{sampler_key(kit, s)}",
                  {"sampler": s, "steps": steps, "size": size, "guidance_scale": GUIDANCE[fam], "negative_prompt": "",
                   "max_sequence_length": length, "family": fam}, {"noise": noise}, text=prompts[0])
