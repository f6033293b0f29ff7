"""The GPU stream (``mode="cuda"``): torch's CUDA generator, Philox 4x32-10 with curand's Box-Muller, as
AUTOMATIC1111's "NV" random source computes it on a CPU.

Checked three ways: the block cipher against the known-answer vectors published with Random123 (the
reference implementation of Philox); the normals against the values printed in A1111's
``modules/rng_philox.py`` docstring; the whole generator (offsets across calls, seeds above 2^32, the
grid-stride mapping of large tensors) against a second implementation written here one value at a time
with Python integers and the ``math`` module.
"""

from __future__ import annotations

import math
import struct

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.core.random import Generator, philox4x32_10, philox_randn, randn

MASK = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# The independent scalar implementation: one counter at a time, Python integers, the math module

def scalar_philox(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK)
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


def f32(x: float) -> float:
    """Round a Python float to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


INV = f32(2.0**-32)  # curand's CURAND_2POW32_INV
INV_2PI = f32(2.3283064e-10 * 6.2831855)  # A1111's float32 constant (float64 product, rounded)


def scalar_pair(a, b):
    u = a * INV + INV / 2
    v = b * INV_2PI + INV_2PI / 2
    s = math.sqrt(-2.0 * math.log(u))
    return f32(s * math.sin(v)), f32(s * math.cos(v))


def scalar_randn(n, seed, offset=0, threads=None):
    """torch's CUDA normal kernel, element by element: thread t, loop turn j, slot k of curand_normal4."""
    key = (seed & MASK, seed >> 32)
    stride = n if threads is None else min(n, threads)
    out = [None] * n
    j = 0
    while j * 4 * stride < n:
        for t in range(stride):
            w = scalar_philox(((offset + j) & MASK, 0, t & MASK, t >> 32), key)
            four = scalar_pair(w[0], w[1]) + scalar_pair(w[2], w[3])
            for k in range(4):
                i = j * 4 * stride + k * stride + t
                if i < n:
                    out[i] = four[k]
        j += 1
    return numpy.array(out, numpy.float32), j


# --------------------------------------------------------------------------------------------------
# Published values

# Random123 (D. E. Shaw Research), examples/kat_vectors: "philox4x32 10" counter, key -> output
RANDOM123_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# AUTOMATIC1111 stable-diffusion-webui, modules/rng_philox.py, the module docstring:
# Generator(seed=0).randn(shape=(3, 4)), printed with 8 decimals.
A1111_DOCSTRING_SEED0 = numpy.array([
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_philox_block_equals_random123_known_answers(counter, key, expected):
    got = philox4x32_10([numpy.array([c], numpy.uint32) for c in counter], key)
    assert tuple(int(w[0]) for w in got) == expected
    assert scalar_philox(counter, key) == expected  # and the test's own implementation


def test_normals_equal_the_values_a1111_publishes():
    """The docstring's values are sqrt(-2 ln u) sin v with exact constants (agreeing to 5e-9 here); the NV code
    itself uses 2 pi 2^-32 rounded to float32 (relative error 2.8e-8), which moves v by up to 1.7e-7 and the
    printed values by up to 3e-7 (measured 2.6e-7). A wrong counter, key or word would move them by O(1)."""
    got = randn((3, 4), seed=0, mode="cuda")
    assert numpy.max(numpy.abs(got - A1111_DOCSTRING_SEED0)) < 3e-7
    n = 12
    w0, w1, _, _ = philox4x32_10((numpy.zeros(n, numpy.uint32), numpy.zeros(n, numpy.uint32),
                                  numpy.arange(n, dtype=numpy.uint32), numpy.zeros(n, numpy.uint32)), (0, 0))
    u = (w0.astype(numpy.float64) + 0.5) * 2.0**-32
    v = (w1.astype(numpy.float64) + 0.5) * (2 * math.pi * 2.0**-32)
    exact = numpy.sqrt(-2 * numpy.log(u)) * numpy.sin(v)
    assert numpy.max(numpy.abs(exact.reshape(3, 4) - A1111_DOCSTRING_SEED0)) < 1e-8


def test_the_constants_are_a1111s_to_the_bit():
    assert numpy.array(INV, numpy.float32).view(numpy.uint32) == 0x2F800000
    assert numpy.array(INV_2PI, numpy.float32).view(numpy.uint32) == 0x30C90FDB


# --------------------------------------------------------------------------------------------------
# Vectorised == scalar

@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1, 2**32, 1234567890123456789, 2**64 - 1])
def test_vectorised_equals_scalar_bit_for_bit(seed):
    for n in (1, 7, 64, 300):
        assert philox_randn(n, seed).tobytes() == scalar_randn(n, seed)[0].tobytes(), (seed, n)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       threads=st.one_of(st.none(), st.integers(1, 24)))
def test_successive_calls_continue_the_stream(seed, sizes, threads):
    """Each randn call moves counter word 0 on by one (by the loop turns, with a thread count)."""
    g = Generator(seed, mode="cuda", cuda_threads=threads)
    offset = 0
    for n in sizes:
        expected, turns = scalar_randn(n, seed, offset, threads)
        assert g.randn((n,)).tobytes() == expected.tobytes()
        offset += turns
        assert g.offset == offset


def test_the_thread_count_changes_only_tensors_larger_than_it():
    """Up to T values every element is its thread's first normal; beyond, the tail takes the cos partners and
    the second pair (torch's grid stride), and the generator moves on by the loop turns."""
    full = philox_randn(100, 7)
    assert philox_randn(100, 7, threads=100).tobytes() == full.tobytes()
    capped = philox_randn(100, 7, threads=16)
    assert capped[:16].tobytes() == full[:16].tobytes() and not numpy.array_equal(capped[16:], full[16:])
    assert capped.tobytes() == scalar_randn(100, 7, threads=16)[0].tobytes()
    g = Generator(7, mode="cuda", cuda_threads=16)
    g.randn((100,))
    assert g.offset == 2  # ceil(100 / (4 * 16))


def test_seed_words_and_offsets_matter():
    a = randn((64,), seed=5, mode="cuda")
    assert not numpy.array_equal(a, randn((64,), seed=5 + 2**32, mode="cuda"))  # key word 1
    g = Generator(5, mode="cuda")
    assert g.randn((64,)).tobytes() == a.tobytes()
    assert not numpy.array_equal(g.randn((64,)), a)  # offset 1
    g.manual_seed(5)
    assert g.offset == 0 and g.randn((64,)).tobytes() == a.tobytes()
    assert not numpy.array_equal(a, randn((64,), seed=5))  # not the CPU stream


def test_statistics_and_half_precision():
    x = randn((100_000,), seed=3, mode="cuda")
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    half = randn((4, 8, 8), seed=3, mode="cuda", dtype="float16")
    assert half.dtype == numpy.float16
    assert numpy.array_equal(half, randn((4, 8, 8), seed=3, mode="cuda").astype(numpy.float16))


@pytest.mark.parametrize("call,match", [
    (lambda: Generator(1, mode="cuda").randn((4,), dtype="float64"), "float32 noise"),
    (lambda: Generator(1, mode="cuda").rand((4,)), "randn only"),
    (lambda: Generator(1, mode="cuda", cuda_threads=0), "cuda_threads must be a positive integer"),
    (lambda: randn((2,), generator=Generator(1), mode="cuda"), "a generator keeps its own mode"),
    (lambda: Generator(1, mode="mps"), "unknown mode 'mps'; choose one of 'torch', 'cuda', 'numpy'"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
