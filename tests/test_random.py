"""refldm.core.random reproduces torch's CPU generator bit for bit: MT19937 words, the float32/float64 uniform, the
scalar Box-Muller for fewer than 16 values (with its cached second value), the blocks of 16 (with the redrawn
tail), the AVX2 float32 kernel that torch uses on x86 and the scalar one it uses elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.core.random import Generator, default_kernel, rand, randn
from tests.conftest import require

DTYPES = ["float32", "float64", "float16"]
SHAPES = [(), (1,), (3,), (7,), (15,), (16,), (17,), (31,), (32,), (33,), (2, 4, 8, 8), (1, 4, 64, 64), (5, 3, 7)]


def _torch_kernel_matches_ours():
    """Which float32 kernel torch uses here, in refldm's terms."""
    torch = require("torch")
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "avx2" if capability in ("AVX2", "AVX512") else "scalar"


def _same_bits(a, b):
    a, b = numpy.asarray(a), numpy.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_auto_kernel_is_the_one_torch_uses_here():
    assert default_kernel() == _torch_kernel_matches_ours()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 42, 1234567, 2**32 - 1, 2**32 + 5, 2**63 + 11])
def test_randn_equals_torch_bit_for_bit(seed, dtype):
    torch = require("torch")
    for shape in SHAPES:
        expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=getattr(torch, dtype))
        assert _same_bits(randn(shape, seed=seed, dtype=dtype), expected.numpy()), (shape, seed, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**64 - 1),
       draws=st.lists(st.tuples(st.lists(st.integers(1, 9), min_size=1, max_size=3),
                                st.sampled_from(["randn", "rand"]), st.sampled_from(DTYPES)),
                      min_size=1, max_size=8))
def test_successive_draws_continue_the_stream_like_one_torch_generator(seed, draws):
    """Mixed small and large draws, normal and uniform, all dtypes: each equals torch's draw on one generator
    (this includes the cached second Box-Muller value carried from one small draw to the next)."""
    torch = require("torch")
    ours, theirs = Generator(seed), torch.Generator("cpu").manual_seed(seed)
    for shape, kind, dtype in draws:
        expected = getattr(torch, kind)(tuple(shape), generator=theirs, dtype=getattr(torch, dtype)).numpy()
        got = getattr(ours, kind)(tuple(shape), dtype=dtype)
        assert _same_bits(got, expected), (shape, kind, dtype)


def test_img2img_order_of_draws_matches_diffusers():
    """diffusers' img2img draws the VAE posterior noise, then the add_noise noise, from one generator."""
    torch = require("torch")
    require("diffusers")
    from diffusers.utils import torch_utils as diffusers_utils
    theirs = torch.Generator("cpu").manual_seed(31)
    posterior = diffusers_utils.randn_tensor((1, 4, 8, 8), generator=theirs, dtype=torch.float32).numpy()
    noise = diffusers_utils.randn_tensor((1, 4, 8, 8), generator=theirs, dtype=torch.float32).numpy()
    ours = Generator(31)
    assert _same_bits(ours.randn((1, 4, 8, 8)), posterior)
    assert _same_bits(ours.randn((1, 4, 8, 8)), noise)


def test_a_list_of_generators_seeds_each_batch_element():
    torch = require("torch")
    seeds = [3, 4, 5]
    expected = numpy.concatenate([torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(s)).numpy()
                                  for s in seeds])
    assert _same_bits(randn((3, 2, 4, 4), generator=[Generator(s) for s in seeds]), expected)


@pytest.mark.skipif(default_kernel() != "avx2", reason="the scalar-kernel check runs torch with "
                    "ATEN_CPU_CAPABILITY=default, which only differs from the default on x86 with AVX2")
def test_scalar_kernel_equals_torch_without_avx2():
    """torch without its AVX2 kernels (ARM, old x86, ATEN_CPU_CAPABILITY=default) uses C logf/cosf/sinf."""
    require("torch")
    code = ("import torch, sys; g = torch.Generator().manual_seed(7); "
            "a = torch.randn(1000, generator=g); b = torch.randn(37, generator=g); "
            "sys.stdout.buffer.write(a.numpy().tobytes() + b.numpy().tobytes())")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    expected = numpy.frombuffer(out, numpy.float32)
    ours = Generator(7, kernel="scalar")
    got = numpy.concatenate([ours.randn((1000,)), ours.randn((37,))])
    assert _same_bits(got, expected)
    assert not _same_bits(Generator(7, kernel="avx2").randn((1000,)), expected[:1000])  # the kernel matters


def test_kernels_agree_within_float32_rounding():
    """The two float32 kernels differ only in the last bits of log/sin/cos (the Cephes float logf loses a few
    bits for arguments near 1): a few float32 ulps, under 5e-6 absolute (measured 1.8e-6 over 1e5 values)."""
    a = Generator(11, kernel="avx2").randn((4096,))
    b = Generator(11, kernel="scalar").randn((4096,))
    assert numpy.max(numpy.abs(a - b)) <= 5e-6
    assert not numpy.array_equal(a, b)


def test_statistics_are_standard_normal_and_uniform():
    x = randn((200_000,), seed=0, dtype="float64")
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    u = rand((200_000,), seed=0)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_numpy_mode_is_plain_numpy_and_reproducible():
    a = Generator(5, mode="numpy").randn((3, 4))
    assert numpy.array_equal(a, numpy.random.default_rng(5).standard_normal(12).astype(numpy.float32).reshape(3, 4))
    assert not numpy.array_equal(a, randn((3, 4), seed=5))
    assert numpy.array_equal(randn((2, 2), generator=numpy.random.default_rng(1)),
                             numpy.random.default_rng(1).standard_normal((2, 2)).astype(numpy.float32))


def test_unseeded_draws_differ_and_manual_seed_restarts():
    assert not numpy.array_equal(randn((64,)), randn((64,)))
    g = Generator(9)
    first = g.randn((20,))
    g.manual_seed(9)
    assert numpy.array_equal(g.randn((20,)), first) and g.initial_seed() == 9


@pytest.mark.parametrize("call,match", [
    (lambda: randn((2,), seed=1, generator=Generator(1)), "either seed or generator"),
    (lambda: randn((2,), dtype="int8"), "unsupported dtype 'int8'"),
    (lambda: randn((2, -1), seed=0), "negative size"),
    (lambda: Generator(1.5), "seed must be an integer"),
    (lambda: Generator(1, mode="gpu"), "unknown mode 'gpu'"),
    (lambda: Generator(1, kernel="sse"), "unknown kernel 'sse'"),
    (lambda: randn((3, 2), generator=[Generator(1), Generator(2)]), "2 generators for shape \\(3, 2\\)"),
    (lambda: randn((2,), generator=object()), "generator must be"),
])
def test_bad_input_is_refused_with_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
