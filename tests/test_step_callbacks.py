"""diffusers' step callback (callback_on_step_end) on refldm's pipelines: same call pattern, same tensors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import (PROMPT, SIZE, STEPS, _diffusers_run, _one_blas_thread, pipe, reference,  # noqa: F401
                                 tiny_folder, torch_one_thread)


def test_callback_sees_diffusers_tensors_and_can_replace_latents(pipe, reference):  # noqa: F811
    """Per step the callback gets diffusers' latents and prompt_embeds ([negative; positive]) within float32
    precision (max |a - b| / max |b| <= 1e-4); halving the latents after step 2 changes both runs alike."""
    torch = require("torch")
    ref, got = [], []

    def ref_cb(p, i, t, kw):
        ref.append((int(t), kw["latents"].double().numpy().copy(), kw["prompt_embeds"].double().numpy().copy()))
        return {"latents": kw["latents"] * 0.5} if i == 2 else {}

    def our_cb(p, i, t, kw):
        assert p is pipe
        got.append((int(t), np.asarray(kw["latents"], np.float64).copy(),
                    np.asarray(kw["prompt_embeds"], np.float64).copy()))
        return {"latents": kw["latents"] * 0.5} if i == 2 else {}

    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5)
    _diffusers_run(reference, "euler", callback=ref_cb,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kwargs)
    pipe(**kwargs, seed=1, sampler="euler", progress=False, callback_on_step_end=our_cb,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert len(got) == len(ref) == STEPS
    for i, ((t1, a, e1), (t2, b, e2)) in enumerate(zip(got, ref)):
        assert t1 == t2, f"step {i}"
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-4, f"step {i}"
        assert e1.shape == e2.shape == (2, 77, e2.shape[-1])
        assert np.abs(e1 - e2).max() / np.abs(e2).max() <= 1e-4, f"step {i}"


@pytest.fixture(scope="module")
def builtin():
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


ARGS = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, seed=3, progress=False,
            output_type="latent")


def test_builtin_callback_pattern_and_replacement(builtin):
    plain = builtin(**ARGS).latents
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, float(t), sorted(kw)))
        assert kw["noise_pred_text"].shape == kw["noise_pred_uncond"].shape == kw["latents"].shape
        assert kw["pred_original_sample"].shape == kw["latents"].shape
        return None

    same = builtin(**ARGS, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=[
        "latents", "noise_pred_uncond", "noise_pred_text", "pred_original_sample"]).latents
    np.testing.assert_array_equal(same, plain)                     # a callback that returns nothing changes nothing
    sched = builtin.make_scheduler()
    sched.set_timesteps(4)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == [float(t) for t in sched.timesteps]
    assert seen[0][2] == ["latents", "noise_pred_text", "noise_pred_uncond", "pred_original_sample"]
    zeroed = builtin(**ARGS, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0}
                     if i == 3 else {}).latents
    assert np.all(zeroed == 0) and np.abs(plain).max() > 0.1       # the returned latents are the loop's


def test_builtin_prompt_embeds_replacement_takes_effect(builtin):
    plain = builtin(**ARGS).latents
    other = builtin(**ARGS, callback_on_step_end=lambda p, i, t, kw: {"prompt_embeds": kw["prompt_embeds"] * 0},
                    callback_on_step_end_tensor_inputs=["prompt_embeds"]).latents
    assert np.abs(other - plain).max() > 1e-3


@pytest.mark.parametrize("names", [["latent"], ["latents", "text_embeds"]])
def test_unknown_tensor_input_is_one_line(builtin, names):
    with pytest.raises(ValueError) as e:
        builtin(**ARGS, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=names)
    assert repr(names[-1]) in str(e.value) and "\n" not in str(e.value)


def test_inpaint_callback_sees_the_blended_latents(builtin):
    from PIL import Image
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_pretrained(DEFAULT_MODEL)
    image = Image.new("RGB", (64, 64), "white")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    args = dict(prompt="a large red circle in the top left on a white background", image=image, mask_image=mask,
                num_inference_steps=3, guidance_scale=3.0, seed=1, progress=False, output_type="latent")
    old, new = [], []
    plain = pipe(**args, callback=lambda i, t, x: old.append(np.asarray(x).copy())).latents
    out = pipe(**args, callback_on_step_end=lambda p, i, t, kw: new.append(np.asarray(kw["latents"]).copy()) or {})
    assert len(new) == 3
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out.latents, plain)
    zeroed = pipe(**args, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0} if i == 2 else {})
    assert np.all(zeroed.latents == 0)
