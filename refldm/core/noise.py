"""The web UIs' noise options: which random numbers an image starts from and which its sampler adds.

The same seed gives different images in AUTOMATIC1111, Forge, ComfyUI and diffusers because they draw
the starting latent differently: from another random stream (CPU, GPU or "NV", see
:mod:`refldm.core.random`), per image or for the whole batch, mixed with a second seed's noise
("variation seed"), drawn at another size and pasted ("seed resize from"), and the sampler's own noise
(ancestral and SDE samplers) from another generator ("ENSD", ComfyUI's separate sampler generator).
Each is written here as a function of seeds and shapes that returns NumPy arrays, as the web UI computes
it (sources named in each docstring). Shapes are per image (C, H, W) unless a batch is named.

    from refldm.core.noise import ImageNoise, comfyui_prepare_noise
    rng = ImageNoise((4, 64, 64), seeds=[1234], rng="NV", variation_seeds=[99], variation_strength=0.3,
                     ensd=31337)
    x_T = rng.first()          # (1, 4, 64, 64): A1111's starting latent (before scaling by sigma_max)
    eps = rng.next()           # the noise of the first ancestral step, and so on
"""

from __future__ import annotations

import numpy

from refldm.core.random import Generator

__all__ = ["RNG_SOURCES", "generator_for", "batch_seeds", "slerp", "paste_resized_noise", "ImageNoise",
           "webui_noise", "comfyui_prepare_noise", "comfyui_sampler_generator"]

# the web UI's "Random number generator source" -> refldm's stream. "GPU" is torch's CUDA generator, which
# the Philox stream reproduces up to the GPU's thread count (refldm.core.random.philox_randn) and to float32
# rounding of curand's sin/log (about 1e-6); "NV" is A1111's CPU imitation of it, reproduced bit for bit.
RNG_SOURCES = {"CPU": "torch", "GPU": "cuda", "NV": "cuda"}


def _mode(rng: str) -> str:
    key = str(rng).upper()
    if key not in RNG_SOURCES:
        raise ValueError(f"rng: unknown random source {rng!r}; choose one of {', '.join(RNG_SOURCES)} "
                         "(or refldm's names: cpu = CPU, cuda = NV)")
    return RNG_SOURCES[key]


def _rng_name(rng: str) -> str:
    """Accept stable-diffusion.cpp's names too (cpu, cuda) and return the web UI's (CPU, NV, GPU)."""
    return {"CUDA": "NV", "TORCH": "CPU"}.get(str(rng).upper(), str(rng).upper())


def generator_for(seed: int, rng: str = "CPU") -> Generator:
    """A fresh generator of the web UI's random source: A1111 ``modules/rng.py`` ``create_generator``
    (CPU: ``torch.Generator("cpu").manual_seed(seed)``; GPU: the same on CUDA; NV: ``rng_philox.Generator``)."""
    return Generator(int(seed), mode=_mode(_rng_name(rng)))


def _check_strength(strength) -> float:
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"variation strength {strength:g} is outside [0, 1]")
    return strength


def batch_seeds(seed: int, batch_size: int, variation_seed: int | None = None, variation_strength: float = 0.0):
    """The seeds of a batch, as A1111 numbers them (``modules/processing.py``, ``process_images_inner``):

        seeds[i]           = seed + i      when the variation strength is 0
                           = seed          otherwise (every image shares the seed ...)
        variation_seeds[i] = variation_seed + i     (... and the variation seeds count up instead)

    Returns (seeds, variation_seeds); variation_seeds is None without a variation seed. diffusers and
    ComfyUI have no such rule: one generator (or one seed) for the whole batch, see
    :func:`comfyui_prepare_noise`.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    strength = _check_strength(variation_strength)
    step = 0 if (strength != 0 and variation_seed is not None) else 1
    seeds = [int(seed) + step * i for i in range(int(batch_size))]
    if variation_seed is None:
        return seeds, None
    return seeds, [int(variation_seed) + i for i in range(int(batch_size))]


def slerp(t: float, low, high):
    """A1111's spherical interpolation of two noises (``modules/rng.py`` ``slerp``), on (C, H, W) arrays.

    It normalises along axis 1 (the rows: ``torch.norm(dim=1)`` of a (C, H, W) tensor), so each column
    (c, :, w) is interpolated on its own great circle:

        d     = <low / |low|, high / |high|>        summed over H, one value per (c, w)
        omega = arccos(d)
        slerp = sin((1 - t) omega) / sin(omega) * low + sin(t omega) / sin(omega) * high

    t = 0 gives `low` (the seed's noise), t = 1 `high` (the variation seed's). When the two are nearly
    parallel (mean of d > 0.9995) the web UI falls back to ``low * t + high * (1 - t)``: the weights
    are swapped with respect to the formula above, and this reproduces that as written. float32 throughout.
    """
    low = numpy.asarray(low, numpy.float32)
    high = numpy.asarray(high, numpy.float32)
    if low.shape != high.shape or low.ndim < 2:
        raise ValueError(f"slerp: the two noises must have one shape (C, H, W), got {low.shape} and {high.shape}")
    t32 = numpy.float32(t)
    low_norm = low / numpy.sqrt(numpy.sum(low * low, axis=1, keepdims=True, dtype=numpy.float32))
    high_norm = high / numpy.sqrt(numpy.sum(high * high, axis=1, keepdims=True, dtype=numpy.float32))
    dot = numpy.sum(low_norm * high_norm, axis=1, dtype=numpy.float32)
    if float(dot.mean()) > 0.9995:
        return (low * t32 + high * (numpy.float32(1) - t32)).astype(numpy.float32)
    omega = numpy.arccos(dot)
    so = numpy.sin(omega)
    a = numpy.expand_dims(numpy.sin((numpy.float32(1.0) - t32) * omega) / so, 1)
    b = numpy.expand_dims(numpy.sin(t32 * omega) / so, 1)
    return (a * low + b * high).astype(numpy.float32)


def paste_resized_noise(small, full):
    """"Seed resize from": the noise drawn at the old size, pasted centred into the new size's noise.

    A1111 (``modules/rng.py`` ``ImageRNG.first``), with (h, w) the old and (H, W) the new latent size:
    dx = (W - w) // 2, dy = (H - h) // 2 (floor division, so negative offsets round down); where the new
    size is larger the old noise lands at (dy, dx) inside the new; where it is smaller the centre
    |dx|, |dy| of the old noise is cut out. Everything outside comes from the new size's own noise.
    """
    small = numpy.asarray(small)
    out = numpy.array(full, copy=True)
    dx = (out.shape[2] - small.shape[2]) // 2
    dy = (out.shape[1] - small.shape[1]) // 2
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


class ImageNoise:
    """A1111's per-image noise (``modules/rng.py`` ``ImageRNG``, web UI 1.6 and later): the starting latent
    of each image of a batch from its own seed, and the sampler's noise from the same per-image generators.

    ``first()`` -> (N, C, H, W): for each image i, with g_i = a fresh generator of ``rng`` seeded seeds[i]:

        x_i = g_i.randn(C, H, W)                                          (no resize)
        x_i = paste(randn(seeds[i], (C, h, w)), g_i.randn(C, H, W))       ("Seed resize from" (w8, h8))
        x_i = slerp(s, x_i', randn(variation_seeds[i], (C, h, w)))        (variation seed, strength s != 0;
                                                                           the slerp comes before the paste)

    where randn(seed, shape) is a fresh generator's first draw. Then, if ``ensd`` (the web UI's "Eta
    noise seed delta") is not 0, every g_i is replaced by a fresh generator seeded seeds[i] + ensd.

    ``next()`` -> (N, C, H, W): the sampler's noise (each ``randn_like`` of an ancestral / SDE step): one
    draw of (C, H, W) from each g_i, stacked. Without ENSD it continues g_i after the starting latent; with
    ENSD it starts g_i's new stream. (The Brownian-tree noise of A1111's DPM++ SDE samplers is seeded
    separately and is not this.)

    ``rng``: "CPU", "GPU" or "NV" as the web UI's "RNG" field (also sd.cpp's "cpu" / "cuda").
    ``seed_resize_from``: (width, height) in pixels, as the web UI's field; sizes are divided by 8.
    """

    def __init__(self, shape, seeds, rng: str = "CPU", variation_seeds=None, variation_strength: float = 0.0,
                 seed_resize_from=None, ensd: int = 0):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"ImageNoise: shape must be one image's latent (C, H, W), got {self.shape}")
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("ImageNoise: no seeds")
        self.rng = _rng_name(rng)
        _mode(self.rng)
        self.variation_seeds = None if variation_seeds is None else [int(s) for s in variation_seeds]
        self.variation_strength = _check_strength(variation_strength)
        if seed_resize_from is not None:
            w, h = (int(v) for v in seed_resize_from)
            if w <= 0 or h <= 0:  # the web UI's "off" (0 or -1)
                seed_resize_from = None
            elif w < 8 or h < 8:
                raise ValueError(f"seed resize from {w}x{h}: each side must be at least 8 pixels")
            else:
                seed_resize_from = (w, h)
        self.seed_resize_from = seed_resize_from
        self.ensd = int(ensd)
        if self.ensd < 0:
            raise ValueError(f"ENSD {self.ensd} must be 0 or more")
        self.generators = [generator_for(s, self.rng) for s in self.seeds]
        self._first_done = False

    def _fresh(self, seed, shape):
        return generator_for(seed, self.rng).randn(shape)

    def first(self):
        c, height, width = self.shape
        noise_shape = self.shape
        if self.seed_resize_from is not None:
            noise_shape = (c, self.seed_resize_from[1] // 8, self.seed_resize_from[0] // 8)
        images = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            sub = None
            if self.variation_seeds is not None and self.variation_strength != 0:
                sub_seed = self.variation_seeds[i] if i < len(self.variation_seeds) else 0
                sub = self._fresh(sub_seed, noise_shape)
            noise = self._fresh(seed, noise_shape) if noise_shape != self.shape else gen.randn(self.shape)
            if sub is not None:
                noise = slerp(self.variation_strength, noise, sub)
            if noise_shape != self.shape:
                noise = paste_resized_noise(noise, gen.randn(self.shape))
            images.append(noise)
        if self.ensd:
            self.generators = [generator_for(s + self.ensd, self.rng) for s in self.seeds]
        self._first_done = True
        return numpy.stack(images).astype(numpy.float32)

    def next(self):
        if not self._first_done:
            return self.first()
        return numpy.stack([g.randn(self.shape) for g in self.generators]).astype(numpy.float32)


def webui_noise(shape, seed: int, batch_size: int = 1, rng: str = "CPU", variation_seed: int | None = None,
                variation_strength: float = 0.0, seed_resize_from=None, ensd: int = 0) -> ImageNoise:
    """A1111's noise for a batch from the fields of its parameters text: the batch's seeds
    (:func:`batch_seeds`) and an :class:`ImageNoise` over them. `shape` is one image's (C, H, W)."""
    seeds, variation_seeds = batch_seeds(seed, batch_size, variation_seed, variation_strength)
    return ImageNoise(shape, seeds, rng=rng, variation_seeds=variation_seeds, variation_strength=variation_strength,
                      seed_resize_from=seed_resize_from, ensd=ensd)


def comfyui_prepare_noise(shape, seed: int, batch_index=None):
    """ComfyUI's starting noise (``comfy/sample.py`` ``prepare_noise``), always on the CPU generator.

    Without ``batch_index``: one draw of the whole batch shape (N, C, H, W) from
    ``torch.manual_seed(seed)``: image i is the i-th block of C*H*W values of one stream (the same numbers
    as i + 1 successive per-image draws when C*H*W is a multiple of 16, as it is for 4 channels and an
    even latent side), not the noise of seed + i as in A1111.

    With ``batch_index`` (a latent's "batch_index", set by ComfyUI's batch nodes): one (1, C, H, W) draw
    per index from 0 to max(batch_index), in order, keeping those whose index is listed; image j gets the
    draw of index batch_index[j] (so a latent picked out of a batch keeps its noise).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"comfyui_prepare_noise: shape must be a batch (N, C, H, W), got {shape}")
    gen = Generator(int(seed))
    if batch_index is None:
        return gen.randn(shape)
    index = [int(i) for i in batch_index]
    if not index or min(index) < 0:
        raise ValueError(f"comfyui_prepare_noise: batch_index must be non-negative indices, got {batch_index}")
    if len(index) != shape[0]:
        raise ValueError(f"comfyui_prepare_noise: {len(index)} batch indices for a batch of {shape[0]}")
    draws = [gen.randn((1,) + shape[1:]) for _ in range(max(index) + 1)]
    return numpy.concatenate([draws[i] for i in index], axis=0)


def comfyui_sampler_generator(seed: int, device: str = "cpu") -> Generator:
    """The generator of ComfyUI's sampler noise: its ancestral and SDE-without-Brownian-tree samplers call
    ``default_noise_sampler(x, seed)`` (``comfy/k_diffusion/sampling.py``), a fresh ``torch.Generator`` on the
    latent's device seeded with the same seed as the starting noise, drawing the whole batch (N, C, H, W)
    per step. On a CUDA GPU that is the CUDA stream ("cuda"), on a CPU the CPU stream ("cpu") -- a
    separate generator from the starting noise either way, which is what sd.cpp's ``--sampler-rng`` and
    refldm's sampler generator argument express."""
    device = str(device).lower()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: ComfyUI's sampler noise is drawn on 'cpu' or 'cuda'")
    return Generator(int(seed), mode="torch" if device == "cpu" else "cuda")
