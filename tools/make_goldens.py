"""Write the golden fixtures of tests/test_goldens.py: float64 outputs of tiny diffusers/transformers models.

    python tools/make_goldens.py            # rewrites tests/data/goldens/{vae,unet,clip}.npz

Each part is a tiny random-weight config built with diffusers (AutoencoderKL, UNet2DConditionModel) or
transformers (CLIPTextModel), fixed seeds throughout. Every weight is filled by `tests.goldens.weight`
(a function of the weight's name, shape and the part's seed), so the fixture stores only the config, the
names and shapes, the inputs and the outputs: a few KB per part, and the fast tests recreate the
weights without torch. The models run in float64; diffusers' sinusoidal timestep embedding, which it
computes in float32 whatever the model's dtype, is patched to float64 for the run (as in
tools/trace_diffusers.py), so the golden is the formula's float64 value.

What each part records (names of the arrays in the .npz):

    vae    image (1, 3, 8, 8) -> mean, logvar (the posterior of encode); scaled_mean = mean * scaling_factor
           (what diffusers' pipelines hand the U-Net); latents (1, 4, 4, 4) in the U-Net's scale ->
           decoded = vae.decode(latents / scaling_factor) (what diffusers' pipelines decode). The config
           is stored without scaling_factor, as older SD 1.x VAE configs are: diffusers' default 0.18215
           applies, and refldm's default must be the same.
    unet   sample (2, 4, 4, 4), timesteps (2,) (one fractional), context (2, 5, 12) -> out
    clip   input_ids (2, 6) -> last_hidden_state, pooler_output, hidden_states (layers + 1, 2, 6, 16) and
           clip_skip_1, clip_skip_2: diffusers' clip_skip, final_layer_norm(hidden_states[-(k + 1)])

Needs the crosscheck extra (torch, diffusers, transformers). Re-run it when a config here changes,
and commit the .npz files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tests.goldens import GOLDENS, save, state  # noqa: E402
from tools.trace_diffusers import float64_timestep_embedding  # noqa: E402


def fill(torch, model, seed: int) -> dict:
    """Set every weight of `model` (float64) to tests.goldens.weight; return {name: shape}."""
    sd = model.state_dict()
    assert all(v.is_floating_point() for v in sd.values()), [k for k, v in sd.items() if not v.is_floating_point()]
    shapes = {name: list(v.shape) for name, v in sd.items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state(shapes, seed).items()}, strict=True)
    return shapes


def saved_config(model, name="config.json") -> dict:
    """The config.json that save_pretrained writes for `model` (what a real checkpoint folder holds)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_config(folder) if hasattr(model, "save_config") else model.config.save_pretrained(folder)
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)


def vae_part(torch, diffusers):
    seed = 1
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=8).double().eval()
    shapes = fill(torch, vae, seed)
    config = saved_config(vae)
    assert config.pop("scaling_factor") == 0.18215  # stored without it: the default must apply
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1.0, 1.0, (1, 3, 8, 8))
    latents = rng.standard_normal((1, 4, 4, 4))
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(image)).latent_dist
        decoded = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    mean = posterior.mean.numpy()
    return dict(config=config, shapes=shapes, seed=seed, arrays=dict(
        image=image, mean=mean, logvar=posterior.logvar.numpy(), scaled_mean=mean * vae.config.scaling_factor,
        latents=latents, decoded=decoded.numpy()))


def unet_part(torch, diffusers):
    seed = 2
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4).double().eval()
    shapes = fill(torch, unet, seed)
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 4, 4, 4))
    timesteps = np.array([999.0, 17.5])
    context = rng.standard_normal((2, 5, 12))
    with torch.no_grad(), float64_timestep_embedding():
        out = unet(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    return dict(config=saved_config(unet), shapes=shapes, seed=seed, arrays=dict(
        sample=sample, timesteps=timesteps, context=context, out=out.numpy()))


def clip_part(torch, transformers):
    seed = 3
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=8, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=38,
        eos_token_id=39, pad_token_id=1, projection_dim=8)
    model = transformers.CLIPTextModel(config).double().eval()
    shapes = fill(torch, model, seed)
    input_ids = np.array([[38, 5, 17, 39, 39, 39], [38, 22, 9, 30, 39, 1]], dtype=np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids), output_hidden_states=True)
        hidden = out.hidden_states
        # diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=k
        final_layer_norm = getattr(model, "text_model", model).final_layer_norm
        skips = {f"clip_skip_{k}": final_layer_norm(hidden[-(k + 1)]).numpy() for k in (1, 2)}
    return dict(config=saved_config(model), shapes=shapes, seed=seed, arrays=dict(
        input_ids=input_ids, last_hidden_state=out.last_hidden_state.numpy(),
        pooler_output=out.pooler_output.numpy(), hidden_states=np.stack([h.numpy() for h in hidden]), **skips))


def main() -> int:
    import torch
    import diffusers
    import transformers

    torch.set_num_threads(1)
    parts = {"vae": vae_part(torch, diffusers), "unet": unet_part(torch, diffusers),
             "clip": clip_part(torch, transformers)}
    for name, part in parts.items():
        path = save(name, part["config"], part["shapes"], part["seed"], part["arrays"])
        print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path):,} bytes, "
              f"{sum(np.prod(s) for s in part['shapes'].values()):,} weights recreated from seed {part['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
