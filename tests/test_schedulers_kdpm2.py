"""The schedulers added for the web UIs' sampler list (issue 15): agreement with diffusers step by step on
hypothesis grids, as tests/test_schedulers.py does for the others (float64 reference <= 1e-10; installed
diffusers at float32 precision), and with table_dtype="float32" against installed diffusers in float32."""

from __future__ import annotations

import pytest
from hypothesis import settings, given

from tests.test_schedulers import _agreement, _timesteps_vs_installed, cases, rel_err, run_diffusers, run_refldm

NEW = ["KDPM2DiscreteScheduler"]


@pytest.mark.parametrize("name", NEW)
def test_new_schedulers_agree_with_diffusers(name):
    @settings(max_examples=25, deadline=None)
    @given(case=cases(name))
    def check(case):
        _agreement(name, case)
        _timesteps_vs_installed(name, case)
    check()


@pytest.mark.parametrize("name", NEW)
def test_new_schedulers_float32_tables_track_installed_diffusers(name):
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    _, _, ref = run_diffusers(name, config, 20, 0, dtype="float32")
    _, _, ours = run_refldm(name, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    # measured 5.5e-6: DPM2's midpoint sigmas go through torch's float32 log and exp (not correctly rounded,
    # like its sqrt; see test_schedulers_float32.py), which NumPy computes correctly rounded
    assert rel_err(ours[-1], ref[-1]) <= 1e-5
