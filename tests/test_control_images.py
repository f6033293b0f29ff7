"""Control-image preprocessors (refldm/core/control_images.py): Canny against cv2.Canny, the simple ones'
properties, and `refldm control`."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageDraw

from refldm.cli import main
from refldm.core import control_images as ci
from tests.conftest import require


def _picture(seed: int, h: int = 64, w: int = 80, channels: int = 3):
    """Shapes and lines on a flat background plus Gaussian noise: long edges, corners and clutter."""
    rng = numpy.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", (w, h), colour())
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.ellipse([x0, y0, x0 + int(rng.integers(5, 40)), y0 + int(rng.integers(5, 40))], fill=colour())
        d.line([tuple(int(v) for v in rng.integers(0, w, 2)), tuple(int(v) for v in rng.integers(0, h, 2))],
               fill=colour(), width=3)
    a = numpy.clip(numpy.asarray(im, dtype=numpy.float64) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    a = a.astype(numpy.uint8)
    return a if channels == 3 else numpy.ascontiguousarray(a[:, :, 0])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("L2gradient", [False, True])
def test_canny_equals_cv2_canny_pixel_for_pixel(channels, L2gradient):
    cv2 = require("cv2")
    edges = 0
    for seed in range(3):
        a = _picture(seed, channels=channels)
        ours, ref = ci.canny(a, 50, 150, L2gradient=L2gradient), cv2.Canny(a, 50, 150, L2gradient=L2gradient)
        assert ours.dtype == numpy.uint8 and ours.shape == ref.shape
        assert int((ours != ref).sum()) == 0
        edges += int((ref > 0).sum())
    assert edges > 500  # the pictures do have edges to agree on


@settings(max_examples=12)
@given(seed=st.integers(0, 2 ** 16), h=st.integers(1, 24), w=st.integers(1, 24), channels=st.sampled_from([1, 3]),
       low=st.floats(0, 400), high=st.floats(0, 400), L2=st.booleans())
def test_canny_equals_cv2_for_any_size_and_thresholds(seed, h, w, channels, low, high, L2):
    """Fractional thresholds (floored), low > high (swapped), one-pixel images, random noise."""
    cv2 = require("cv2")
    rng = numpy.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3) if channels == 3 else (h, w), dtype=numpy.uint8)
    assert numpy.array_equal(ci.canny(a, low, high, L2gradient=L2), cv2.Canny(a, low, high, L2gradient=L2))


def test_sobel_equals_cv2_sobel_with_replicated_border():
    cv2 = require("cv2")
    a = _picture(4, channels=1)
    gx, gy = ci.sobel(a)
    assert numpy.array_equal(gx, cv2.Sobel(a, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE))
    assert numpy.array_equal(gy, cv2.Sobel(a, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE))


def test_gaussian_blur_within_one_level_of_cv2():
    """cv2 blurs uint8 in fixed point; refldm in float64, rounded: at most 1 level apart (on ~6% of values
    of this picture, measured)."""
    cv2 = require("cv2")
    a = _picture(5)
    diff = numpy.abs(ci.gaussian_blur(a, 3.0).astype(int) - cv2.GaussianBlur(a, (0, 0), 3.0).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.1


def test_canny_of_a_flat_image_has_no_edges_and_a_step_gives_one_line():
    assert not ci.canny(numpy.full((16, 16), 77, numpy.uint8)).any()
    step = numpy.zeros((16, 16), numpy.uint8)
    step[:, 8:] = 255
    edges = ci.canny(step)
    cols = numpy.nonzero(edges.any(axis=0))[0]
    assert len(cols) == 1 and cols[0] in (7, 8) and edges[:, cols[0]].all()


def test_canny_threshold_order_does_not_matter():
    a = _picture(6)
    assert numpy.array_equal(ci.canny(a, 200, 50), ci.canny(a, 50, 200))


def test_simple_preprocessors_shapes_and_properties():
    a = _picture(7, h=128, w=128)
    s = ci.scribble(a)
    assert s.shape == (128, 128) and set(numpy.unique(s)) <= {0, 255}
    assert (s > 0).sum() > (ci.canny(a) > 0).sum()               # strokes thicker than the edges
    assert ci.blur(a, 2.0).shape == a.shape and ci.blur(a, 2.0).std() < a.std()
    flat = numpy.full((32, 40, 3), 90, numpy.uint8)
    assert numpy.array_equal(ci.blur(flat, 3.0), flat) and numpy.array_equal(ci.tile(flat, 4), flat)
    c = ci.color(a, 64)
    assert c.shape == a.shape and all(len(numpy.unique(c[i:i + 64, j:j + 64].reshape(-1, 3), axis=0)) == 1
                                      for i in (0, 64) for j in (0, 64))
    sh = ci.shuffle(a, seed=3, f=32)
    assert sh.shape == a.shape and numpy.array_equal(sh, ci.shuffle(a, seed=3, f=32))
    assert not numpy.array_equal(sh, ci.shuffle(a, seed=4, f=32))
    assert sh.min() >= a.min() and sh.max() <= a.max()           # bilinear: no value outside the image's


@pytest.mark.parametrize("call, message", [
    (lambda: ci.canny(numpy.zeros((4, 4), numpy.float32)), "uint8"),
    (lambda: ci.canny(numpy.zeros((4, 4, 2), numpy.uint8)), "shape"),
    (lambda: ci.canny(numpy.zeros((4, 4), numpy.uint8), float("nan"), 10), "low_threshold"),
    (lambda: ci.canny(numpy.zeros((4, 4), numpy.uint8), 10, -1), "high_threshold"),
    (lambda: ci.blur(numpy.zeros((4, 4), numpy.uint8), 0), "sigma"),
    (lambda: ci.tile(numpy.zeros((4, 4), numpy.uint8), 0), "factor"),
    (lambda: ci.color(numpy.zeros((4, 4), numpy.uint8), 1.5), "block"),
])
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_cli_control_canny_writes_the_edges(tmp_path, capsys):
    a = _picture(8)
    Image.fromarray(a).save(tmp_path / "in.png")
    assert main(["control", "canny", str(tmp_path / "in.png"), "-o", str(tmp_path / "e.png"),
                 "--low", "60", "--high", "120"]) == 0
    out = numpy.asarray(Image.open(tmp_path / "e.png"))
    assert numpy.array_equal(out, ci.canny(a, 60, 120))
    assert main(["control", "canny", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
