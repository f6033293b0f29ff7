"""`refldm explain`: the page (refldm/analysis/explain.py), its CLI, and the page in a real browser.

The browser test runs the Debian package `chromium` headless on the page opened from a file (.ci/run installs
it where missing). A copy of the page gets a first script that notes console errors and failed loads and,
once the page has loaded, writes what it found (images that did not decode, errors, the page's text) into
the DOM, which ``chromium --dump-dom`` prints. A control page with a broken image and a console error shows
that these checks can fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from refldm.cli import main

PROMPT = "a large red circle in the top left on a white background"
LIMIT = 5_000_000  # bytes, the default page's budget


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The default page (built-in model, 10 steps, every token), written by the CLI."""
    path = tmp_path_factory.mktemp("explain") / "explain.html"
    assert main(["explain", "-p", PROMPT, "-o", str(path)]) == 0
    return path


def test_page_is_self_contained_small_and_complete(page):
    text = page.read_text(encoding="utf-8")
    assert os.path.getsize(page) < LIMIT
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) >= 10 * 5 + 1                              # five pictures per step, and the image
    for tag in imgs:
        assert re.search(r'\salt="[^"]+"', tag), tag[:80]        # alt text on every image
        assert 'src="data:image/png;base64,' in tag              # inline, nothing to fetch
    assert "<script" not in text and "<link" not in text and "url(" not in text
    assert not re.search(r'(src|href)="(https?:|//)', text)
    assert text.count("<svg") >= 3                               # the schedule plots and the prediction plot
    assert f"Prompt: <b id=\"prompt\">{PROMPT}</b>" in text and '<b id="steps">10</b>' in text
    assert [int(k) for k in re.findall(r"<h3>token (\d+):", text)] == list(range(1, 13))  # every token mapped
    assert "<h3>token 4: circle</h3>" in text and "<h3>token 3: red</h3>" in text
    assert "Steps: 10, Sampler: DDIM, CFG scale: 3, Seed: 0, Size: 64x64" in text    # the PNG parameters


def test_cli_bad_input_one_line(tmp_path, capsys):
    (tmp_path / "folder.html").mkdir()
    for args, message in ((["-o", str(tmp_path / "folder.html")], "is a folder"),
                          (["-o", str(tmp_path / "x.png")], "must end in .html"),
                          (["-o", str(tmp_path / "x.html"), "--steps", "0"], "--steps"),
                          (["-o", str(tmp_path / "x.html"), "-m", str(tmp_path / "none")], "no such model")):
        assert main(["explain", "-p", "x", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_chosen_tokens_and_one_beyond_the_text(tmp_path, capsys):
    path = tmp_path / "t.html"
    assert main(["explain", "-p", PROMPT, "-o", str(path), "--steps", "2", "--token", "4", "--token", "99"]) == 0
    assert "note: token 99 ignored: the prompt has 12 tokens (1..12)" in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    assert re.findall(r"<h3>token (\d+):", text) == ["4"] and "Note: token 99 ignored" in text


def test_model_without_tokenizer_is_named():
    from refldm.about import DEFAULT_MODEL
    from refldm.analysis.explain import explain
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.tokenizer = None
    with pytest.raises(ValueError, match="refldm-default: has no tokenizer"):
        explain(pipe, "x", num_inference_steps=2)


# -- in the browser --------------------------------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
const __error = console.error;
console.error = function (...a) { window.__errors.push('console.error: ' + a.join(' ')); __error.apply(console, a); };
window.addEventListener('error', e => window.__errors.push('error: ' +
    (e.message || (e.target && (e.target.currentSrc || e.target.tagName)) || 'unknown').slice(0, 80)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               missing_alt: imgs.filter(i => !i.alt).length, errors: window.__errors, text: document.body.innerText};
  const pre = document.createElement('pre');
  pre.id = '__checks';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (.ci/run does: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


def _run(exe, tmp_path, *flags):
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _checks(exe, tmp_path, html_text, name):
    probe = tmp_path / name
    probe.write_text(html_text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    run = _run(exe, tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="__checks">(.*?)</pre>', run.stdout, re.S)
    assert m, (run.returncode, run.stderr[-2000:])
    import html as html_module
    found = json.loads(html_module.unescape(m.group(1)))
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return found, console


@pytest.mark.slow
def test_page_in_headless_chromium(page, tmp_path):
    exe = _chromium()
    found, console = _checks(exe, tmp_path, page.read_text(encoding="utf-8"), "probe.html")
    assert found["images"] >= 51 and found["broken"] == [] and found["missing_alt"] == 0
    assert found["errors"] == [] and console == []
    assert PROMPT in found["text"] and "Steps: 10" in found["text"]
    shot = tmp_path / "explain.png"
    run = _run(exe, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2400) and len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not blank


@pytest.mark.slow
def test_browser_checks_catch_a_broken_page(tmp_path):
    exe = _chromium()
    bad = ('<!DOCTYPE html><html><head><title>t</title></head><body><img src="data:image/png;base64,AAAA" '
           'alt="broken"><img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    found, console = _checks(exe, tmp_path, bad, "bad.html")
    assert found["broken"] == ["broken", ""] and found["missing_alt"] == 1
    assert any("boom" in e for e in found["errors"]) and any("boom" in line for line in console)


# -- SDXL: two text encoders, the SDXL latent-to-RGB factors and VAE scaling -------------------------------------

@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """refldm's own tiny SDXL base (refldm/crosscheck/tiny.py: NumPy only, VAE scaling factor 0.13025)."""
    from refldm.crosscheck.tiny import build
    return build("sdxl", tmp_path_factory.mktemp("xl") / "sdxl")


def test_sdxl_page_from_the_cli(sdxl_folder, tmp_path, capsys):
    path = tmp_path / "xl.html"
    assert main(["explain", "-p", "a red circle", "-m", sdxl_folder, "-o", str(path), "--steps", "3"]) == 0
    assert "note: no negative prompt: the unconditional half gets zero text embeddings" in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    assert '<b id="steps">3</b>' in text and "Sampler: Euler" in text
    assert re.findall(r"<h3>token \d+: (\w+)</h3>", text) == ["a", "red", "circle"]      # the first tokenizer's
    assert "CLIPTextModel (8 wide) + CLIPTextModelWithProjection (16 wide)" in text and "24 features" in text
    assert "77 tokens x 24" in text and "plus the 6 time ids" in text
    for tag in re.findall(r"<img\b[^>]*>", text):
        assert re.search(r'\salt="[^"]+"', tag), tag[:80]
    assert "Original size: 16x16" in text or "Size: 16x16" in text


def test_sdxl_explanation_previews_maps_and_sigmas(sdxl_folder):
    from refldm.analysis.explain import explain
    from refldm.core.images import to_uint8
    from refldm.models.latent_rgb import latent_to_rgb
    from refldm.pipelines.preview import decode_preview
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ex = explain(pipe, "a red circle", num_inference_steps=3, negative_prompt="blue")
    assert not ex.notes and ex.latent_shape == (1, 4, 4, 4) and ex.text_shape == (77, 24)
    # Euler's last step lands on its x_0 estimate (sigma_next = 0): the preview decodes as the image does,
    # through the SDXL VAE's scaling factor
    np.testing.assert_array_equal(ex.step_images[-1]["x0"], np.asarray(ex.image))
    sched = pipe.make_scheduler()
    sched.set_timesteps(3)
    np.testing.assert_allclose(ex.sigmas, np.asarray(sched.sigmas)[:3], rtol=1e-6)   # sigma per step
    assert ex.sigmas[0] > ex.sigmas[1] > ex.sigmas[2] > 0
    for hw, m in ex.attention.items():                  # probabilities over the 77 tokens at every pixel
        assert m.shape == (77, *hw)
        np.testing.assert_allclose(m.sum(axis=0), 1.0, atol=1e-6)
    # the linear preview takes SDXL's factors (scaling factor 0.13025), not SD 1.x's
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    want = np.repeat(np.repeat(to_uint8(latent_to_rgb(z, "sdxl")), 4, axis=1), 4, axis=2)
    np.testing.assert_array_equal(decode_preview(pipe, z, "linear"), want)
    assert not np.array_equal(want, np.repeat(np.repeat(to_uint8(latent_to_rgb(z, "sd1")), 4, axis=1), 4, axis=2))
    from refldm.analysis.attention_maps import attention_maps      # the Python API takes SDXL too
    maps = attention_maps(pipe, "a red circle", num_inference_steps=3, negative_prompt="blue", guidance_scale=3.0,
                          seed=0, progress=False)
    assert maps.tokens == ["a", "red", "circle"]
    np.testing.assert_allclose(maps.maps[(2, 2)].mean(axis=0)[0], ex.attention[(2, 2)], atol=1e-6)  # same run


@pytest.mark.slow
def test_sdxl_page_in_headless_chromium(tmp_path):
    """An SDXL page (a tiny base built by diffusers) opened from a file: every image decodes, no errors."""
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    exe = _chromium()
    folder = build_tiny_sdxl(tmp_path / "xl", seed=0)
    path = tmp_path / "xl.html"
    assert main(["explain", "-p", "a red circle", "-m", folder, "-o", str(path), "--steps", "2"]) == 0
    found, console = _checks(exe, tmp_path, path.read_text(encoding="utf-8"), "probe.html")
    assert found["images"] >= 2 * 5 + 1 and found["broken"] == [] and found["missing_alt"] == 0
    assert found["errors"] == [] and console == []
    assert "a red circle" in found["text"] and "Steps: 2" in found["text"] and "text encoders" in found["text"]


# -- SD3 and FLUX: flow matching (sigma per step, x_0 = x_t - sigma v), no maps of the joint attention ---------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_model_pages_show_sigma_and_say_there_are_no_maps(family, tmp_path, capsys):
    """Tiny SD3 / FLUX folders built by diffusers: the page names sigma = t / 1000 per step, decodes x_0 = x_t -
    sigma v (at the last step that is the image: Euler's last step goes to sigma = 0) and says why no maps."""
    from refldm.analysis.explain import explain
    if family == "sd3":
        from refldm.pipelines.sd3 import StableDiffusion3Pipeline as cls
        from tests.test_sd3_pipeline import build_tiny_sd3 as build
    else:
        from refldm.pipelines.flux import FluxPipeline as cls
        from tests.test_flux_pipeline import build_tiny_flux as build
    folder = build(tmp_path / family)
    path = tmp_path / "flow.html"
    assert main(["explain", "-p", "a red circle", "-m", str(folder), "-o", str(path), "--steps", "3",
                 "-W", "32", "-H", "32"]) == 0
    printed = capsys.readouterr().out
    assert "note: attention maps are not drawn" in printed and "3 steps, 0 token maps" in printed
    text = path.read_text(encoding="utf-8")
    assert '<b id="steps">3</b>' in text and "sigma = t / 1000" in text and 'id="no-maps"' in text
    assert "1 a, 2 red, 3 circle" in text and "<h3>token" not in text
    pipe = cls.from_pretrained(folder)
    ex = explain(pipe, "a red circle", num_inference_steps=3, height=32, width=32)
    assert ex.family == family and ex.attention == {} and ex.latent_shape[1] == 16
    assert ex.sigmas[0] == 1.0 and ex.sigmas[0] > ex.sigmas[1] > ex.sigmas[2] > 0
    np.testing.assert_allclose(np.asarray(ex.timesteps) / 1000, ex.sigmas)
    last = np.abs(ex.step_images[-1]["x0"].astype(int) - np.asarray(ex.image, int))
    assert last.max() <= 1                                   # x_0 = x_t - sigma v in float64 vs the float32 step
    first = np.abs(ex.step_images[0]["x0"].astype(int) - np.asarray(ex.image, int))
    assert first.max() > last.max()                          # and it is an estimate, not the image, early on
    if family == "sd3":
        assert ex.cost["unet_flops"] > 0 and "eps_u" in ex.step_images[0]            # CFG: v_u and v_c
        assert "v_c - v_u" in text and "MMDiT, per step" in text
    else:
        assert ex.cost["unet_flops"] is None and "eps_u" not in ex.step_images[0]   # distilled: no v_u
        assert "not counted" in text and "guidance-distilled" in text
