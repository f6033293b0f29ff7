"""`refldm txt2img --no-t5` on an SD3 folder: the T5 encoder is not loaded and zeros stand in for its states, as
diffusers' StableDiffusion3Pipeline with text_encoder_3=None. The folder is refldm's tiny SD3 (with a T5 encoder
and tokenizer, refldm/crosscheck/tiny.py), which diffusers loads too; the 8-bit images agree to 2/255."""

from __future__ import annotations

import numpy as np
import pytest

from refldm.crosscheck import tiny
from tests.conftest import require
from tests.test_cli import run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build("sd3", tmp_path_factory.mktemp("sd3_no_t5") / "model")


def test_no_t5_leaves_t5_out_and_matches_diffusers_without_text_encoder_3(folder, tmp_path, capsys):
    from PIL import Image
    torch = require("torch")
    diffusers = require("diffusers")
    out = tmp_path / "no_t5.png"
    rc, _, err = run(capsys, "txt2img", "-m", str(folder), "-p", "a red circle", "--seed", "3", "-W", "32", "-H",
                     "32", "--steps", "4", "--cfg", "5", "--no-t5", "-q", "-o", str(out))
    assert rc == 0, err
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    with_t5 = tmp_path / "t5.png"
    assert run(capsys, "txt2img", "-m", str(folder), "-p", "a red circle", "--seed", "3", "-W", "32", "-H", "32",
               "--steps", "4", "--cfg", "5", "-q", "-o", str(with_t5))[0] == 0
    assert np.abs(np.asarray(Image.open(with_t5).convert("RGB")).astype(int) - ours).max() > 2  # T5 matters
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    theirs = (theirs * 255).round().astype(int)
    assert np.abs(ours - theirs).max() <= 2


def test_no_t5_loads_no_t5_and_other_models_refuse_it(folder, tmp_path, capsys, monkeypatch):
    from refldm.cli import generate
    seen = {}
    original = generate._load_without_t5

    def spy(args, img2img):
        pipe = original(args, img2img)
        seen["t5"] = pipe.text_encoder_3
        return pipe
    monkeypatch.setattr(generate, "_load_without_t5", spy)
    rc, _, err = run(capsys, "txt2img", "-m", str(folder), "-p", "x", "-W", "16", "-H", "16", "--steps", "1",
                     "--no-t5", "-q", "-o", str(tmp_path / "a.png"))
    assert rc == 0 and seen == {"t5": None}, err
    rc, _, err = run(capsys, "txt2img", "-p", "x", "--steps", "1", "--no-t5", "-q", "-o", str(tmp_path / "b.png"))
    assert rc == 2 and "--no-t5" in err and "not an SD3" in err and len(err.strip().splitlines()) == 1
