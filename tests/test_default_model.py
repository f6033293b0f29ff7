"""Semantic end-to-end tests of the embedded default model, run by refldm alone (no torch).

They check what a user sees: the prompted colour lands in the prompted place, img2img recolours a shape,
and the VAE round trip keeps a shape's colour and position. Colours are judged by the mean RGB of the
pixels that differ from the background, which is how tools/train_tiny/evaluate.py judges them too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from refldm.accel import single_threaded_blas
from refldm.core.images import to_tensor, to_uint8

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refldm", "default_model")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


@pytest.fixture(scope="module")
def pipe():
    from refldm import StableDiffusionPipeline
    with single_threaded_blas():
        yield StableDiffusionPipeline.from_pretrained(FOLDER)


def foreground(img: np.ndarray, background=(255, 255, 255)):
    """(mean RGB of the pixels unlike the background, their centroid (row, col) in [0, 1])."""
    diff = np.abs(img.astype(np.int32) - np.array(background)).sum(-1)
    mask = diff > 120
    assert mask.sum() > 20, "no shape was drawn"
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return img[mask].mean(0), (rows.mean() / h, cols.mean() / w)


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - rgb) ** 2))


def square_image(colour: str, centre=(0.5, 0.5), side=28) -> Image.Image:
    img = np.full((64, 64, 3), 255, np.uint8)
    r, c = int(centre[0] * 64) - side // 2, int(centre[1] * 64) - side // 2
    img[r:r + side, c:c + side] = COLOURS[colour]
    return Image.fromarray(img)


@pytest.mark.parametrize("colour, place, where", [("red", "top left", (0.25, 0.25)),
                                                  ("blue", "bottom right", (0.75, 0.75))])
def test_prompted_colour_lands_in_the_prompted_place(pipe, colour, place, where):
    prompt = f"a large {colour} square in the {place} on a white background"
    with single_threaded_blas():
        out = pipe(prompt, num_inference_steps=25, guidance_scale=3.0, seed=3, progress=False)
    rgb, (r, c) = foreground(np.asarray(out.images[0]))
    assert nearest_colour(rgb) == colour, rgb
    assert abs(r - where[0]) < 0.2 and abs(c - where[1]) < 0.2, (r, c)


def test_img2img_recolours_a_red_square_blue(pipe):
    red = square_image("red")
    assert nearest_colour(foreground(np.asarray(red))[0]) == "red"
    with single_threaded_blas():
        out = pipe("a large blue square in the center on a white background", image=red, strength=0.7,
                   num_inference_steps=25, guidance_scale=3.0, seed=0, progress=False)
    rgb, _ = foreground(np.asarray(out.images[0]))
    assert nearest_colour(rgb) == "blue", rgb


@pytest.mark.parametrize("colour, centre", [("red", (0.3, 0.7)), ("green", (0.7, 0.3)), ("yellow", (0.5, 0.5))])
def test_vae_round_trip_keeps_colour_and_place(pipe, colour, centre):
    img = square_image(colour, centre, side=20)
    with single_threaded_blas():
        latent = pipe.vae.encode(to_tensor(img)).mode()          # (1, 4, 8, 8): 48x fewer values
        back = to_uint8(pipe.vae.decode(latent))[0]              # (64, 64, 3)
    assert latent.shape == (1, 4, 8, 8)
    rgb, (r, c) = foreground(back)
    assert nearest_colour(rgb) == colour, rgb
    assert abs(r - centre[0]) < 0.06 and abs(c - centre[1]) < 0.06, (r, c)
