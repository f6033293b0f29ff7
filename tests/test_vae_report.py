"""refldm.analysis.vae_report's metrics against independent implementations and invariants; ``refldm vae-report``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from refldm.analysis import probe_images, vae_report
from refldm.cli import main
from tests.conftest import require


def _noisy(a, seed, spread=30):
    rng = np.random.default_rng(seed)
    return np.clip(a.astype(np.int16) + rng.integers(-spread, spread + 1, a.shape), 0, 255).astype(np.uint8)


def _blur(a, sigma):
    from scipy.ndimage import gaussian_filter

    return np.clip(np.round(gaussian_filter(a.astype(np.float64), (sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _pairs():
    """Test images: every probe at 64 px against a noisy and a blurred copy, and odd-sized random images."""
    rng = np.random.default_rng(1)
    for i, name in enumerate(probe_images.PROBES):
        a = np.asarray(probe_images.probe(name, 64))
        yield name + "-noisy", a, _noisy(a, i)
        yield name + "-blurred", a, _blur(a, 1.5)
    a = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    yield "random-odd", a, _noisy(a, 9, 80)


@pytest.mark.parametrize("name,a,b", list(_pairs()), ids=[p[0] for p in _pairs()])
def test_ssim_and_psnr_equal_scikit_image(name, a, b):
    """SSIM within 1e-6 of skimage.metrics.structural_similarity (7x7 uniform window, sample
    covariance, mean over RGB channels); PSNR within 1e-9 dB of skimage's and of the formula."""
    require("skimage")
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    assert abs(vae_report.ssim(a, b) - structural_similarity(a, b, channel_axis=-1, data_range=255)) < 1e-6
    gray_a, gray_b = a[..., 0], b[..., 0]
    assert abs(vae_report.ssim(gray_a, gray_b) - structural_similarity(gray_a, gray_b, data_range=255)) < 1e-6
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    direct = 10 * math.log10(255 ** 2 / mse)
    assert abs(vae_report.psnr(a, b) - direct) < 1e-9
    assert abs(vae_report.psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9


def test_identical_images_are_perfect():
    a = np.asarray(probe_images.probe("text", 64))
    m = vae_report.measure(a, a.copy())
    assert m["psnr"] == math.inf and m["ssim"] == 1.0 and m["edge_correlation"] == pytest.approx(1.0, abs=1e-12)
    assert all(b["energy_kept"] == pytest.approx(1.0, abs=1e-12) and b["relative_error"] == 0.0
               for b in m["bands"])
    assert m["worst_region"]["psnr"] == math.inf


def test_blurring_loses_the_high_bands_first():
    a = np.asarray(probe_images.probe("noise", 128))
    bands = vae_report.band_energy(a, _blur(a, 1.0))
    kept = [b["energy_kept"] for b in bands]
    assert all(x > y for x, y in zip(kept, kept[1:]))        # monotonically less kept, band by band
    assert kept[0] > 0.8 and kept[-1] < 0.01
    # a stronger blur keeps less in every band
    stronger = [b["energy_kept"] for b in vae_report.band_energy(a, _blur(a, 2.0))]
    assert all(s < k for s, k in zip(stronger, kept))


def test_band_energy_of_a_scaled_image_is_the_square_of_the_scale():
    a = np.asarray(probe_images.probe("zone_plate", 64)).astype(np.float64)
    b = (a - a.mean()) * 0.5 + a.mean()                        # same mean (DC), every frequency halved
    for band in vae_report.band_energy(a, b):
        assert band["energy_kept"] == pytest.approx(0.25, rel=1e-12)
        assert band["relative_error"] == pytest.approx(0.25, rel=1e-12)


def test_band_energy_has_no_value_where_the_input_has_no_energy():
    flat = np.full((32, 32, 3), 100, np.uint8)
    assert all(b["energy_kept"] is None for b in vae_report.band_energy(flat, _noisy(flat, 0)))
    assert vae_report.edge_correlation(flat, _noisy(flat, 0)) is None


def test_worst_region_finds_the_damaged_tile():
    a = np.asarray(probe_images.probe("gradient", 64))
    b = a.copy()
    b[40:48, 16:24] = 255 - b[40:48, 16:24]
    w = vae_report.worst_region(a, b)
    assert (w["x"], w["y"], w["width"], w["height"]) == (16, 40, 8, 8)
    assert w["psnr"] < vae_report.psnr(a, b)


def test_edges_moved_by_a_pixel_correlate_less():
    a = np.asarray(probe_images.probe("lines", 64))
    assert vae_report.edge_correlation(a, np.roll(a, 1, axis=1)) < 0.9


def test_probe_images_are_deterministic_rgb_of_the_given_size():
    for name in probe_images.PROBES:
        im = probe_images.probe(name, 96)
        assert im.mode == "RGB" and im.size == (96, 96)
        assert np.array_equal(np.asarray(im), np.asarray(probe_images.probe(name, 96)))
    with pytest.raises(ValueError, match="multiple of 8"):
        probe_images.probe("lines", 100)


@pytest.fixture
def image_files(tmp_path):
    """An RGB PNG, a grayscale one of another size, an RGBA one, and one of a size not divisible by 8."""
    paths = {}
    paths["rgb"] = tmp_path / "rgb.png"
    probe_images.probe("flat", 32).save(paths["rgb"])
    paths["gray"] = tmp_path / "gray.png"
    probe_images.probe("checkers", 40).convert("L").save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    probe_images.probe("gradient", 32).convert("RGBA").save(paths["rgba"])
    paths["odd"] = tmp_path / "odd.png"
    Image.fromarray(np.asarray(probe_images.probe("text", 40))[:27, :35]).save(paths["odd"])
    return paths


def test_cli_vae_report_json_and_picture(image_files, tmp_path, capsys):
    out = tmp_path / "report.png"
    files = [str(image_files[k]) for k in ("rgb", "gray", "rgba", "odd")]
    assert main(["vae-report", *files, "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["builtin"] and len(report["images"]) == 4
    sizes = [(r["width"], r["height"]) for r in report["images"]]
    assert sizes == [(32, 32), (40, 40), (32, 32), (35, 27)]          # each at its own size
    notes = [" ".join(r["notes"]) for r in report["images"]]
    assert notes[0] == "" and "grayscale image converted to RGB" in notes[1]
    assert "RGBA image converted to RGB, alpha dropped" in notes[2]
    assert "35x27 is not a multiple of 8: padded to 40x32" in notes[3]
    for r in report["images"]:
        assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 and len(r["bands"]) == 8
    with Image.open(out) as im:
        assert im.width == 4 * vae_report.PANEL + 5 * 8 and im.height > 4 * vae_report.PANEL


def test_cli_vae_report_is_deterministic_and_agrees_with_the_functions(image_files, capsys):
    from refldm.models.vae import AutoencoderKL

    assert main(["vae-report", str(image_files["rgb"]), "--json", "--bands", "4"]) == 0
    first = json.loads(capsys.readouterr().out)["images"][0]
    vae = AutoencoderKL.from_pretrained(vae_report._default_vae())
    pixels, _ = vae_report.load_rgb(image_files["rgb"])
    recon, _ = vae_report.reconstruct(vae, pixels)
    assert first["psnr"] == vae_report.psnr(pixels, recon) and first["ssim"] == vae_report.ssim(pixels, recon)
    assert len(first["bands"]) == 4


def test_cli_vae_report_text(image_files, capsys):
    assert main(["vae-report", str(image_files["gray"])]) == 0
    out = capsys.readouterr().out
    assert "built-in VAE: a small model" in out and "energy kept" in out and "note: grayscale" in out


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing.png"), "no such file"),
    (lambda p: (p / "bad.png").write_text("not an image") and str(p / "bad.png"), "not an image"),
    (lambda p: Image.new("RGB", (5, 5)).save(p / "tiny.png") or str(p / "tiny.png"), "too small"),
    (lambda p: None, "give image files, or --probes"),
])
def test_cli_vae_report_bad_input_is_one_line(make, message, tmp_path, capsys):
    path = make(tmp_path)
    assert main(["vae-report"] + ([path] if path else [])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_vae_report_takes_a_pipeline_folder(image_files, capsys):
    assert main(["vae-report", str(image_files["rgb"]), "-m", "refldm/default_model", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["builtin"] and report["images"][0]["psnr"] > 0     # the built-in VAE, named by its folder


def test_cli_vae_report_tiling_runs_tile_by_tile_and_stays_close(tmp_path, capsys):
    """--tiling (vae.enable_tiling()) on an image larger than the built-in VAE's 64-pixel tile: the report
    is the tiled reconstruction (it differs from the untiled one, the cross-faded borders) and measures
    about the same quality."""
    path = tmp_path / "shapes.png"
    probe_images.probe("flat", 128).save(path)
    assert main(["vae-report", str(path), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["images"][0]
    assert main(["vae-report", str(path), "--json", "--tiling"]) == 0
    tiled = json.loads(capsys.readouterr().out)["images"][0]
    assert tiled["psnr"] != whole["psnr"]                      # really tiled
    assert abs(tiled["psnr"] - whole["psnr"]) < 3.0            # and still the same VAE's quality (dB)
