"""`refldm cost --measure` on an SD3 folder: one refldm MMDiT call timed on the latent and on the pixels, with the
FLOPs counted for exactly those calls (`count_sd3`); refldm's tiny SD3 (refldm/crosscheck/tiny.py) as the model."""

from __future__ import annotations

import json

import pytest

from refldm.analysis import cost
from refldm.cli import main
from refldm.crosscheck import tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build("sd3", tmp_path_factory.mktemp("cost_mmdit") / "model")


def test_cost_measure_times_the_mmdit_on_latent_and_pixels(folder, capsys):
    assert main(["cost", folder, "-H", "32", "-W", "32", "--measure", "--measure-size", "16", "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)
    m = fig["measure"]
    cfg = json.load(open(f"{folder}/transformer/config.json"))
    assert m["latent"]["shape"] == [2, 16, 4, 4] and m["pixel"]["shape"] == [2, 3, 16, 16]
    assert m["latent"]["flops"] == cost.count_sd3(cfg, 4, 4, 2, 333).flops
    assert m["pixel"]["flops"] == cost.count_sd3({**cfg, "in_channels": 3, "out_channels": 3}, 16, 16, 2, 333).flops
    assert m["pixel"]["flops"] > m["latent"]["flops"] > 0 and m["latent"]["seconds"] > 0
    assert m["flops_ratio"] == pytest.approx(m["pixel"]["flops"] / m["latent"]["flops"])
    assert main(["cost", folder, "-H", "32", "-W", "32", "--measure", "--measure-size", "16"]) == 0
    assert "measured (refldm, random weights, float32" in capsys.readouterr().out
    assert main(["cost", folder, "--measure", "--measure-size", "12"]) == 2
    err = capsys.readouterr().err
    assert "--measure-size 12" in err and "multiple of 8" in err
