"""The web UIs' noise options (refldm/core/noise.py): batch seeds, variation seed (slerp), seed resize, ENSD and
the sampler's generator, ComfyUI's prepare_noise, each against the web UI's code transcribed here with torch."""

from __future__ import annotations

import numpy
import pytest

from refldm.core.noise import (ImageNoise, batch_seeds, comfyui_prepare_noise, comfyui_sampler_generator,
                               generator_for, paste_resized_noise, slerp, webui_noise)
from refldm.core.random import Generator, randn
from tests.conftest import require

SHAPE = (4, 8, 8)


# --------------------------------------------------------------------------------------------------
# A1111's code (modules/rng.py, web UI 1.6+), transcribed with torch, CPU source

def torch_slerp(torch, val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def torch_image_rng(torch, shape, seeds, subseeds, strength, resize_hw, ensd, steps):
    def fresh(seed, shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise_shape = shape if resize_hw is None else (shape[0], resize_hw[0] // 8, resize_hw[1] // 8)
    xs = []
    for i, (seed, g) in enumerate(zip(seeds, gens)):
        sub = fresh(subseeds[i], noise_shape) if subseeds is not None and strength != 0 else None
        noise = fresh(seed, noise_shape) if noise_shape != shape else torch.randn(shape, generator=g)
        if sub is not None:
            noise = torch_slerp(torch, strength, noise, sub)
        if noise_shape != shape:
            x = torch.randn(shape, generator=g)
            dx = (shape[2] - noise_shape[2]) // 2
            dy = (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx, ty = (0 if dx < 0 else dx), (0 if dy < 0 else dy)
            dx, dy = max(-dx, 0), max(-dy, 0)
            x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
            noise = x
        xs.append(noise)
    if ensd:
        gens = [torch.Generator().manual_seed(s + ensd) for s in seeds]
    out = [torch.stack(xs)]
    for _ in range(steps):
        out.append(torch.stack([torch.randn(shape, generator=g) for g in gens]))
    return [o.numpy() for o in out]


@pytest.mark.parametrize("seeds,subseeds,strength,resize_hw,ensd", [
    ([5], None, 0.0, None, 0),
    ([5, 6], None, 0.0, None, 31337),
    ([5, 5], [77, 78], 0.3, None, 0),
    ([5], [77], 0.3, (48, 72), 0),  # resize from 72x48 pixels (a 9x6 latent) into 8x8: paste and cut
    ([9], [1], 1.0, (96, 64), 31337),  # a larger old size (12x8), cut to the centre
])
def test_image_noise_equals_a1111s_image_rng(seeds, subseeds, strength, resize_hw, ensd):
    torch = require("torch")
    expected = torch_image_rng(torch, SHAPE, seeds, subseeds, strength, resize_hw, ensd, steps=2)
    ours = ImageNoise(SHAPE, seeds, rng="CPU", variation_seeds=subseeds, variation_strength=strength,
                      seed_resize_from=None if resize_hw is None else (resize_hw[1], resize_hw[0]), ensd=ensd)
    got = [ours.first(), ours.next(), ours.next()]
    for g, e in zip(got, expected):
        if strength in (0.0, 1.0):
            assert g.tobytes() == e.tobytes()  # no arithmetic: the streams themselves, bit for bit
        else:
            assert numpy.max(numpy.abs(g - e)) <= 2e-6  # float32 slerp: norms and sums in another order


def test_slerp_equals_a1111s_formula_and_its_endpoints():
    torch = require("torch")
    low, high = randn((4, 16, 8), seed=1), randn((4, 16, 8), seed=2)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        expected = torch_slerp(torch, t, torch.from_numpy(low), torch.from_numpy(high)).numpy()
        assert numpy.max(numpy.abs(slerp(t, low, high) - expected)) <= 2e-6, t
    assert numpy.array_equal(slerp(0.0, low, high), low) and numpy.array_equal(slerp(1.0, low, high), high)
    # the near-parallel branch keeps the web UI's swapped weights: t = 0.25 -> 0.25 low + 0.75 high
    near = low + numpy.float32(1e-3) * high
    assert numpy.allclose(slerp(0.25, low, near), 0.25 * low + 0.75 * near, atol=1e-6)


def test_slerp_keeps_the_column_norms_of_equal_norm_inputs():
    """On each column (c, :, w) it moves along the great circle: the norm stays where both norms are equal."""
    low = randn((2, 32, 3), seed=4)
    high = randn((2, 32, 3), seed=5)
    high = high / numpy.linalg.norm(high, axis=1, keepdims=True) * numpy.linalg.norm(low, axis=1, keepdims=True)
    mid = slerp(0.5, low, high)
    assert numpy.allclose(numpy.linalg.norm(mid, axis=1), numpy.linalg.norm(low, axis=1), rtol=1e-5)


def test_batch_seeds_follow_the_web_ui():
    assert batch_seeds(10, 3) == ([10, 11, 12], None)
    assert batch_seeds(10, 3, variation_seed=50, variation_strength=0.0) == ([10, 11, 12], [50, 51, 52])
    assert batch_seeds(10, 3, variation_seed=50, variation_strength=0.4) == ([10, 10, 10], [50, 51, 52])


def test_image_noise_without_options_is_each_seeds_stream():
    for rng, mode in (("CPU", "torch"), ("NV", "cuda"), ("cuda", "cuda"), ("cpu", "torch")):
        noise = webui_noise(SHAPE, 3, batch_size=2, rng=rng)
        first, step = noise.first(), noise.next()
        for i, seed in enumerate((3, 4)):
            g = Generator(seed, mode=mode)
            assert first[i].tobytes() == g.randn(SHAPE).tobytes() and step[i].tobytes() == g.randn(SHAPE).tobytes()
    noise = webui_noise(SHAPE, 3, rng="NV", ensd=31337)
    noise.first()
    assert noise.next()[0].tobytes() == generator_for(3 + 31337, "NV").randn(SHAPE).tobytes()


def test_paste_resized_noise_centres_the_old_noise():
    small = numpy.arange(2 * 4 * 6, dtype=numpy.float32).reshape(2, 4, 6)
    full = -numpy.ones((2, 8, 4), numpy.float32)
    out = paste_resized_noise(small, full)
    # rows: new 8 > old 4 -> pasted at row 2; columns: new 4 < old 6 -> old columns 1..4 cut out
    assert numpy.array_equal(out[:, 2:6, :], small[:, :, 1:5])
    assert (out[:, :2] == -1).all() and (out[:, 6:] == -1).all()


def test_comfyui_prepare_noise_equals_its_code():
    torch = require("torch")

    def prepare_noise(shape, seed, noise_inds=None):  # comfy/sample.py
        generator = torch.manual_seed(seed)
        if noise_inds is None:
            return torch.randn(shape, generator=generator, device="cpu")
        unique_inds, inverse = numpy.unique(noise_inds, return_inverse=True)
        noises = []
        for i in range(unique_inds[-1] + 1):
            noise = torch.randn([1] + list(shape)[1:], generator=generator, device="cpu")
            if i in unique_inds:
                noises.append(noise)
        return torch.cat([noises[i] for i in inverse], axis=0)

    shape = (3, 4, 6, 6)
    for inds in (None, [0, 1, 2], [2, 0, 2], [5, 1, 3]):
        expected = prepare_noise(shape, 1234, inds).numpy()
        assert comfyui_prepare_noise(shape, 1234, inds).tobytes() == expected.tobytes(), inds


def test_comfyui_batch_is_one_stream_not_seed_plus_i():
    batch = comfyui_prepare_noise((2,) + SHAPE, 8)
    g = Generator(8)
    assert batch[0].tobytes() == g.randn(SHAPE).tobytes() and batch[1].tobytes() == g.randn(SHAPE).tobytes()
    assert not numpy.array_equal(batch[1], randn(SHAPE, seed=9))
    assert comfyui_sampler_generator(8, "cuda").mode == "cuda" and comfyui_sampler_generator(8).mode == "torch"


@pytest.mark.parametrize("call,match", [
    (lambda: batch_seeds(1, 2, 3, 1.5), r"variation strength 1.5 is outside \[0, 1\]"),
    (lambda: batch_seeds(1, 0), "batch size 0 must be at least 1"),
    (lambda: ImageNoise(SHAPE, [1], rng="mps"), "unknown random source 'MPS'; choose one of CPU, GPU, NV"),
    (lambda: ImageNoise(SHAPE, [1], variation_strength=-0.1), "outside"),
    (lambda: ImageNoise((1, 4, 8, 8), [1]), "one image's latent"),
    (lambda: ImageNoise(SHAPE, [1], seed_resize_from=(4, 64)), "at least 8 pixels"),
    (lambda: ImageNoise(SHAPE, [1], ensd=-1), "ENSD -1"),
    (lambda: slerp(0.5, numpy.zeros((4, 8, 8)), numpy.zeros((4, 8, 9))), "one shape"),
    (lambda: comfyui_prepare_noise((2, 4, 8, 8), 1, [0]), "1 batch indices for a batch of 2"),
    (lambda: comfyui_sampler_generator(1, "mps"), "'cpu' or 'cuda'"),
])
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
