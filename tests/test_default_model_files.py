"""The shipped default model (refldm/default_model/) is a real diffusers Stable Diffusion folder.

Cheap checks of the files themselves: layout, size, safetensors only, consistent configs, the CLIP
tokenizer round-trips the captions it was built from, and diffusers' own StableDiffusionPipeline
loads the folder offline and draws what a prompt asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require

FOLDER = Path(__file__).resolve().parent.parent / "refldm" / "default_model"
PARTS = {
    "scheduler": {"scheduler_config.json"},
    "text_encoder": {"config.json", "model.safetensors"},
    "tokenizer": {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"},
    "unet": {"config.json", "diffusion_pytorch_model.safetensors"},
    "vae": {"config.json", "diffusion_pytorch_model.safetensors"},
}
MAX_BYTES = 20 * 1024 * 1024
CAPTIONS = [
    "a small red circle in the top left on a white background",
    "a large cyan star in the bottom right on a black background",
    "a medium purple cross in the center on a gray background",
    "a yellow diamond in the center left",
    "an orange triangle on a gray background",
    "a blue square",
]
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40),
           "purple": (150, 60, 200), "orange": (250, 140, 30), "cyan": (40, 200, 210)}


def config(part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((FOLDER / part / name).read_text())


def test_folder_has_exactly_the_diffusers_layout():
    files = {p.relative_to(FOLDER).as_posix() for p in FOLDER.rglob("*") if p.is_file()}
    expected = {"model_index.json"} | {f"{part}/{name}" for part, names in PARTS.items() for name in names}
    assert files == expected


def test_folder_is_small_and_holds_no_pickles():
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"default model is {total / 2**20:.1f} MiB, over 20 MiB"
    assert not [p for p in FOLDER.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_model_index_names_stable_diffusion_classes():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"][0] == "diffusers"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


def test_configs_fit_together():
    vae, unet, text, sched = config("vae"), config("unet"), config("text_encoder"), config("scheduler")
    tok = json.loads((FOLDER / "tokenizer" / "tokenizer_config.json").read_text())
    vocab = json.loads((FOLDER / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert vae["latent_channels"] == unet["in_channels"] == unet["out_channels"] == 4
    assert 2 ** (len(vae["block_out_channels"]) - 1) == vae["sample_size"] // unet["sample_size"] == 8
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert text["max_position_embeddings"] == tok["model_max_length"]
    assert text["vocab_size"] == len(vocab)
    assert 0 < vae["scaling_factor"] < 10
    assert sched["num_train_timesteps"] == 1000 and sched["beta_schedule"] == "scaled_linear"


def test_vocabulary_has_clip_layout():
    vocab = json.loads((FOLDER / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    merges = (FOLDER / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    # 256 byte symbols, the same with "</w>", one token per merge, then the two specials
    assert len(vocab) == 512 + (len(merges) - 1) + 2
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    for line in merges[1:]:
        left, right = line.split(" ")
        assert left + right in vocab


@pytest.fixture(scope="module")
def tokenizer():
    transformers = require("transformers")
    return transformers.CLIPTokenizer.from_pretrained(FOLDER / "tokenizer", local_files_only=True)


def test_tokenizer_round_trips_captions(tokenizer):
    for caption in CAPTIONS:
        ids = tokenizer(caption)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # every caption word is one token of the vocabulary
        assert len(ids) == len(caption.split()) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_tokenizer_pads_to_model_max_length(tokenizer):
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True)["input_ids"]
    assert {len(row) for row in ids} == {tokenizer.model_max_length}
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def pipeline():
    torch = require("torch")
    diffusers = require("diffusers")
    require("transformers")
    torch.set_num_threads(2)
    # the weights are stored in float16; ask for float32 (transformers 5 would otherwise keep the text
    # encoder in the checkpoint's float16, which the CPU cannot multiply with float32 activations)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(FOLDER, dtype=torch.float32,
                                                             local_files_only=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    return torch, pipe


def shape_pixels(image):
    """(colour name, (cx, cy)) of the pixels far from the background (the median of the border)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    far = np.abs(image - np.median(border, axis=0)).max(axis=-1) > 60         # (64, 64) bool
    rgb = np.median(image[far], axis=0)
    colour = min(PALETTE, key=lambda k: sum((a - b) ** 2 for a, b in zip(PALETTE[k], rgb)))
    ys, xs = np.nonzero(far)
    return colour, (xs.mean(), ys.mean())


def test_diffusers_pipeline_draws_the_prompted_colour_in_the_prompted_place(pipeline):
    torch, pipe = pipeline
    out = pipe(["a large red circle in the center on a white background",
                "a large blue square in the top left on a black background"],
               num_inference_steps=20, guidance_scale=3.0, output_type="np",
               generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).images
    assert out.shape == (2, 64, 64, 3)
    images = (out * 255).round()

    colour, (cx, cy) = shape_pixels(images[0])
    assert colour == "red" and 64 / 3 < cx < 128 / 3 and 64 / 3 < cy < 128 / 3   # the centre cell
    colour, (cx, cy) = shape_pixels(images[1])
    assert colour == "blue" and cx < 64 / 3 and cy < 64 / 3                      # the top-left cell
    # and the border holds the prompted background (nearest of white, black, gray)
    backdrops = {"white": 255.0, "black": 0.0, "gray": 128.0}
    for image, expected in ((images[0], "white"), (images[1], "black")):
        border = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
        assert min(backdrops, key=lambda k: np.abs(border - backdrops[k]).sum()) == expected
