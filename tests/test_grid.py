"""refldm.grid and `refldm grid`: axes checked before any work, cells from their own settings, the same bytes in
this process, in 2 local processes and on a Dask LocalCluster (a worker killed mid-grid included), resume, a
failing cell recorded without stopping the others. The built-in model at 32x32, 2 steps: each cell ~50 ms."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.grid import GridSpec, parse_axis, plan, run

PROMPT = "a large red circle in the center on a white background"


def _spec(out, **kw):
    base = dict(x="sampler=Euler a,DDIM", y="seed=1,2", width=32, height=32, steps=2, cfg=3.0, out=str(out))
    base.update(kw)
    return GridSpec(PROMPT, **base)


def _files(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith(".png")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 2 x 2 grid run in this process: {file: bytes}, and its manifest."""
    out = tmp_path_factory.mktemp("grid") / "ref"
    manifest = run(_spec(out), progress=False)
    return _files(out), manifest


# -- the axes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("sampler=Euler q", r"--x sampler: 'Euler q': unknown sampler"),
    ("steps=1,x", r"--x steps: 'x': not an integer"),
    ("steps=0", r"--x steps: '0': must lie in 1\.\.10000"),
    ("steps=", r"--x steps: the axis has no values"),
    ("steps=2,,3", r"--x steps: value 2 is empty"),
    ("cfg=300", r"--x cfg: '300': must lie in \[0, 100\]"),
    ("cfg=nan", r"--x cfg: 'nan'"),
    ("size=64x60", r"--x size: '64x60': the sides must be positive multiples of 8"),
    ("size=big", r"--x size: 'big': give WIDTHxHEIGHT"),
    ("seed=-1", r"--x seed: '-1': must lie in 0\.\.18446744073709551615"),
    ("denoise=0", r"--x denoise: '0': must lie in \(0, 1\]"),
    ("dtype=float8", r"--x dtype: 'float8': choose one of float32, float64, float16"),
    ("accel=fast", r"--x accel: 'fast': choose one of speed, reference"),
    ("rng=gpu2", r"--x rng: 'gpu2': unknown random source"),
    ("checkpoint=/no/such/model", r"--x checkpoint: '/no/such/model': no such model folder or file"),
    ("clip_skip=a", r"--x clip_skip: 'a': not an integer"),
    ("prompt=dog", r"--x prompt: give the text to search and at least one replacement"),
    ("colour=1,2", r"--x: unknown axis kind 'colour'"),
    ("steps", r"--x 'steps': give KIND=V1,V2"),
])
def test_a_bad_axis_value_is_named_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_axis("x", text)
    assert "\n" not in str(e.value)


def test_the_web_ui_names_and_quoted_values_are_taken():
    axis = parse_axis("y", 'Prompt S/R=red circle,"blue square, small",green')
    assert axis.kind == "prompt" and axis.values == ("red circle", "blue square, small", "green")
    assert parse_axis("x", "CFG Scale=3, 7.5").values == (3.0, 7.5)
    assert parse_axis("x", "size=64x32,32X64").values == ((64, 32), (32, 64))
    assert parse_axis("x", "checkpoint=builtin").values == (None,)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 10000), min_size=1, max_size=6))
def test_an_axis_of_steps_reads_back_its_values(values):
    axis = parse_axis("z", "steps=" + ",".join(map(str, values)))
    assert axis.values == tuple(values) and axis.labels == tuple(map(str, values))


def test_the_whole_grid_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--y steps: 'ten': not an integer"):
        run(_spec(tmp_path / "a", y="steps=2,ten"), progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"--x and --y both vary seed"):
        plan(_spec(tmp_path / "a", x="seed=1,2"))
    with pytest.raises(ValueError, match=r"--x prompt: 'dog' does not occur in the prompt"):
        plan(_spec(tmp_path / "a", x="prompt=dog,cat"))
    with pytest.raises(ValueError, match=r"--x lora: give the LoRA file"):
        plan(_spec(tmp_path / "a", x="lora=0,1"))
    with pytest.raises(ValueError, match=r"--y denoise: the denoising strength needs an image"):
        plan(_spec(tmp_path / "a", y="denoise=0.5"))
    with pytest.raises(ValueError, match=r"give at least one axis"):
        plan(_spec(tmp_path / "a", x=None, y=None))
    from refldm.errors import TooLargeError
    big = _spec(tmp_path / "a", x="seed=" + ",".join(map(str, range(11))),
                y="steps=" + ",".join(map(str, range(1, 11))))
    with pytest.raises(TooLargeError, match=r"the grid has 110 cells \(11 seed x 10 steps\), more than 100; "
                                            r"give --yes"):
        plan(big)
    assert len(plan(big, yes=True)[1]) == 110
    with pytest.raises(ValueError, match=r"the cell size: 40x40, seed: 1: hires_scale=1\.5 makes 40x40 into 60x60"):
        plan(_spec(tmp_path / "a", x="size=32x32,40x40", hires_scale=1.5))


def test_prompt_search_replace_changes_the_prompt_and_the_negative(tmp_path):
    axes, cells, _ = plan(_spec(tmp_path / "a", x="prompt=red,blue,green", y=None, negative="red ink"))
    assert [c.settings["prompt"] for c in cells] == [PROMPT, PROMPT.replace("red", "blue"),
                                                     PROMPT.replace("red", "green")]
    assert [c.settings["negative"] for c in cells] == ["red ink", "blue ink", "green ink"]


# -- the cells --------------------------------------------------------------------------------------------------


def test_a_cell_is_what_txt2img_makes_with_its_settings(reference, tmp_path):
    """The cell x=DDIM, y=seed 2 is the pipeline's own image for those settings, whatever ran before it; its PNG
    carries the web UIs' parameters text and the cell's settings."""
    from PIL import Image

    from refldm.about import DEFAULT_MODEL
    from refldm.grid.cell import KEY_CHUNK
    from refldm.pipelines.sd import StableDiffusionPipeline
    files, manifest = reference
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    out = pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=2, sampler="DDIM",
               progress=False)
    with Image.open(io.BytesIO(files["z00-y01-x01.png"])) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(out.images[0]))
        assert im.text["parameters"] == out.parameters[0]
        assert json.loads(im.text[KEY_CHUNK])["seed"] == 2 and json.loads(im.text[KEY_CHUNK])["sampler"] == "DDIM"
    cell = next(c for c in manifest["cells"] if c["file"] == "z00-y01-x01.png")
    assert cell["status"] == "ok" and cell["labels"] == ["sampler: DDIM", "seed: 2"] and cell["seconds"] > 0
    assert files["z00-y00-x00.png"] != files["z00-y01-x00.png"]  # seeds 1 and 2 differ


def test_the_grid_image_and_manifest(reference, tmp_path):
    from PIL import Image
    files, manifest = reference
    assert manifest["grids"] == ["grid.png"] and len(manifest["cells"]) == 4
    assert [a["values"] for a in manifest["axes"]] == [["Euler a", "DDIM"], ["1", "2"]]
    with Image.open(io.BytesIO(files["grid.png"])) as grid:
        # 2 x 2 tiles of 128 (32 x 4) plus the labels' margins
        assert grid.width > 2 * 128 and grid.height > 2 * 128
        pixels = np.asarray(grid.convert("L"))
        assert (pixels[:20] < 128).any()  # the column labels are drawn above the tiles


def test_resume_keeps_the_same_cells_and_refuses_other_ones(reference, tmp_path):
    files, _ = reference
    out = tmp_path / "g"
    out.mkdir()
    for name in ("z00-y00-x00.png", "z00-y01-x01.png"):
        (out / name).write_bytes(files[name])
    with pytest.raises(FileExistsError, match=r"holds a grid already \(z00-y00-x00\.png\); give --resume"):
        run(_spec(out), progress=False)
    manifest = run(_spec(out), resume=True, progress=False)
    assert [c["status"] for c in manifest["cells"]] == ["resumed", "ok", "ok", "resumed"]
    assert _files(out) == files
    with pytest.raises(FileExistsError, match=r"z00-y00-x00\.png: a PNG of other parameters \(steps 2, this "
                                              r"grid's 3\); --resume continues the same grid only"):
        run(_spec(out, steps=3), resume=True, progress=False)
    assert _files(out) == files  # nothing was overwritten
    (out / "z00-y05-x00.png").write_bytes(files["grid.png"])
    with pytest.raises(FileExistsError, match=r"z00-y05-x00\.png: a cell of another grid"):
        run(_spec(out), resume=True, progress=False)


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path):
    """A LoRA axis over a corrupt LoRA file: scale 0 runs without it, scale 1 fails (manifest, crossed tile)."""
    from PIL import Image
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "g"
    manifest = run(_spec(out, x="lora=0,1", y=None, lora=str(bad)), progress=False)
    ok, failed = manifest["cells"]
    assert ok["status"] == "ok" and failed["status"] == "failed"
    assert "broken.safetensors" in failed["error"] and "\n" not in failed["error"]
    assert sorted(_files(out)) == ["grid.png", "z00-y00-x00.png"]
    with Image.open(out / "grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red[:, pixels.shape[1] // 2:].sum() > 200 and red[:, : pixels.shape[1] // 2].sum() == 0


def test_a_lora_scale_axis_and_the_cached_model_stays_clean(tmp_path):
    from refldm.checkpoints.weights import save_file
    rng = np.random.default_rng(0)
    lora = tmp_path / "conv.safetensors"
    save_file({"lora_unet_conv_out.lora_down.weight": rng.standard_normal((2, 64, 3, 3)).astype(np.float32) * 0.05,
               "lora_unet_conv_out.lora_up.weight": rng.standard_normal((4, 2, 1, 1)).astype(np.float32) * 0.05},
              lora)
    out = tmp_path / "g"
    manifest = run(_spec(out, x="lora=0,1,0", y=None, lora=str(lora)), progress=False)
    assert [c["status"] for c in manifest["cells"]] == ["ok"] * 3
    files = _files(out)
    assert files["z00-y00-x00.png"] == files["z00-y00-x02.png"] != files["z00-y00-x01.png"]
    assert "LoRA: conv.safetensors:1" in manifest["cells"][1]["parameters"]


def test_the_accel_axis_needs_the_switch_the_cli_passes(tmp_path):
    from refldm.accel import enabled, is_enabled
    with pytest.raises(ValueError, match=r"accel_switch=refldm\.accel\.enabled"):
        run(_spec(tmp_path / "g", y="accel=speed,reference"), progress=False)
    before = is_enabled()
    manifest = run(_spec(tmp_path / "g", y="accel=speed,reference"), progress=False, accel_switch=enabled)
    assert is_enabled() == before
    assert [c["status"] for c in manifest["cells"]] == ["ok"] * 4
    assert "Ops: reference" in manifest["cells"][3]["parameters"]


# -- executors --------------------------------------------------------------------------------------------------


def test_two_local_processes_give_the_same_bytes(reference, tmp_path):
    files, _ = reference
    manifest = run(_spec(tmp_path / "g"), workers=2, progress=False)
    assert _files(tmp_path / "g") == files
    assert manifest["executor"] == "2 local processes"
    assert all(c["where"] and not c["where"].endswith(f":{os.getpid()}") for c in manifest["cells"])


@pytest.fixture(scope="module")
def dask_client():
    import distributed  # the `cluster` extra, installed by the test set-up

    from refldm.grid.executors import local_cluster
    cluster = local_cluster(2, memory_limit="1GiB", silence_logs=50)  # 1 thread each here: the same bytes still
    client = distributed.Client(cluster, timeout=30)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.mark.slow
def test_a_local_cluster_gives_the_same_bytes_and_keeps_the_model(reference, dask_client, tmp_path):
    files, _ = reference
    manifest = run(_spec(tmp_path / "g"), client=dask_client, progress=False)
    assert _files(tmp_path / "g") == files
    assert manifest["executor"].startswith("dask tcp://")
    from refldm.grid import cell
    cached = dask_client.run(lambda: len(cell._CACHE))
    assert sum(cached.values()) >= 1  # the workers keep the model they loaded for the next grid


@pytest.mark.slow
def test_a_worker_killed_mid_grid_has_its_cells_rerun_elsewhere(dask_client, tmp_path):
    """SIGKILL the worker process that finished the first cell while it holds further cells: the scheduler
    re-runs them on the other worker (and the restarted one), and every cell has the bytes of an in-process run."""
    spec = dict(x="seed=1,2,3,4,5,6", y=None, steps=6)
    run(_spec(tmp_path / "here", **spec), progress=False)
    killed = []

    def kill_first(record):
        if not killed:
            pid = int(record["where"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    manifest = run(_spec(tmp_path / "dask", **spec), client=dask_client, progress=False, on_result=kill_first)
    assert killed and [c["status"] for c in manifest["cells"]] == ["ok"] * 6
    assert _files(tmp_path / "dask") == _files(tmp_path / "here")
    later = [c["where"] for c in manifest["cells"]]
    assert any(not w.endswith(f":{killed[0]}") for w in later)


# -- the command line -------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    from refldm.cli import main
    code = main(["grid", "-p", PROMPT, "-W", "32", "-H", "32", "--steps", "2", "-q", *argv])
    return code, capsys.readouterr()


def test_the_cli_writes_the_grid_and_names_bad_input(reference, tmp_path, capsys):
    files, _ = reference
    code, out = _cli(capsys, "--x", "sampler=Euler a,DDIM", "--y", "seed=1,2", "--cfg", "3", "-o", str(tmp_path / "g"))
    assert code == 0 and "wrote" in out.out and "4 of 4 cells" in out.out
    assert _files(tmp_path / "g") == files
    code, out = _cli(capsys, "--x", "steps=2,zz", "-o", str(tmp_path / "h"))
    assert code == 2 and out.err.strip() == "refldm: error: --x steps: 'zz': not an integer"
    code, out = _cli(capsys, "--x", "seed=1,2", "--cluster", "tcp://127.0.0.1:9", "--timeout", "0.5",
                     "-o", str(tmp_path / "h"))
    assert code == 2 and out.err.strip().startswith("refldm: error: --cluster tcp://127.0.0.1:9: no Dask scheduler "
                                                    "answered within 0.5 s")
    assert not (tmp_path / "h").exists()


def test_the_cli_without_dask_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    code, out = _cli(capsys, "--x", "seed=1,2", "--cluster", "local:1", "-o", str(tmp_path / "g"))
    assert code == 2 and out.err.strip() == ("refldm: error: --cluster needs dask.distributed, which is not "
                                             "installed: pip install 'refldm[cluster]'")


# -- refldm vectors for several models through the same executors ------------------------------------------------


def _tree(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.mark.slow
def test_several_bundles_on_a_cluster_are_the_bundles_of_one_run_each(dask_client, tmp_path, capsys):
    from refldm.cli import main
    from refldm.grid.bundles import run_bundles
    assert main(["vectors", "--tiny", "sd15", "--parts", "vae", "--out", str(tmp_path / "one")]) == 0
    jobs = [{"tiny": "sd15", "parts": ["vae"], "out": str(tmp_path / "many" / "tiny-sd15")},
            {"model": str(tmp_path / "one" / "model"), "parts": ["vae"], "size": 16, "steps": 3, "detail": "all",
             "out": str(tmp_path / "many" / "folder")},  # the same tiny model as a folder, tiny's settings
            {"model": str(tmp_path / "one"), "parts": ["vae"], "out": str(tmp_path / "many" / "bad")}]
    from refldm.accel import enabled
    records = run_bundles(jobs, client=dask_client, progress=False, accel_switch=enabled)
    assert [r["status"] for r in records] == ["ok", "ok", "failed"] and records[0]["cases"] == 107
    assert "\n" not in records[2]["error"]
    assert _tree(tmp_path / "many" / "tiny-sd15") == _tree(tmp_path / "one")
    assert _tree(tmp_path / "many" / "folder")["vae.safetensors"] == _tree(tmp_path / "one")["vae.safetensors"]
    with pytest.raises(ValueError, match=r"two bundles would be written to the same folder"):
        run_bundles([jobs[0], jobs[0]], progress=False)


def test_the_vectors_command_takes_several_models(tmp_path, capsys):
    from refldm.cli import main
    with pytest.raises(SystemExit):
        main(["vectors", "--tiny", "sd15,nope", "--out", str(tmp_path / "x")])
    assert "unknown tiny kind 'nope'" in capsys.readouterr().err
    assert main(["vectors", str(tmp_path / "a"), "--tiny", "sd15", "--out", str(tmp_path / "x")]) == 2
    assert "no such model folder" in capsys.readouterr().err and not (tmp_path / "x" / "tiny-sd15").exists()


def test_cells_are_grouped_by_checkpoint_and_each_model_loads_once(tmp_path, monkeypatch):
    """x = checkpoint alternates models in the cells' order; run grouped, a one-model cache loads each once."""
    from refldm.about import DEFAULT_MODEL
    from refldm.grid import cell
    from refldm.grid.cell import default_loader
    loads = []

    def loader(model, dtype="float32", img2img=False):
        loads.append(model)
        return default_loader(model, dtype=dtype, img2img=img2img)

    monkeypatch.setattr(cell, "CACHE_SIZE", 1)
    manifest = run(_spec(tmp_path / "g", x=f"checkpoint=builtin,{DEFAULT_MODEL}", y="seed=1,2,3"), progress=False,
                   loader=loader)
    assert loads == [None, DEFAULT_MODEL]  # grouped: each model once (ordered by model, then cell)
    files = _files(tmp_path / "g")
    assert [c["status"] for c in manifest["cells"]] == ["ok"] * 6
    with pytest.raises(ValueError, match=r"denoise \(--strength\) needs an image"):
        plan(_spec(tmp_path / "h", denoise=0.5))
    assert len(files) == 7


def test_size_rng_and_img2img_denoise_axes(tmp_path):
    from PIL import Image
    manifest = run(_spec(tmp_path / "g", x="size=32x32,40x32", y="rng=cpu,cuda"), progress=False)
    assert [c["status"] for c in manifest["cells"]] == ["ok"] * 4
    files = _files(tmp_path / "g")
    sizes = [Image.open(io.BytesIO(files[c["file"]])).size for c in manifest["cells"]]
    assert sizes == [(32, 32), (40, 32), (32, 32), (40, 32)]
    assert "RNG: NV" in manifest["cells"][2]["parameters"] and files["z00-y00-x00.png"] != files["z00-y01-x00.png"]
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    manifest = run(_spec(tmp_path / "i", x="denoise=0.5,1", y=None, image=str(tmp_path / "in.png")), progress=False)
    assert [c["status"] for c in manifest["cells"]] == ["ok"] * 2
    assert "Denoising strength: 0.5" in manifest["cells"][0]["parameters"]
