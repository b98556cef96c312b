"""V4.1's fake-quant roundings, bit for bit against mlx-vlm 0.7.10's, and the switch that sets them."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.model import fakequant as fq

import vlm_reference


def _tensors():
    """Values across many binades, exact ties of the e2m1 grid, zeros and a tiny block."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((8, 512)) * np.exp2(rng.integers(-20, 12, (8, 512)))
    ties = np.tile(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, -0.25, -2.5, -5.0,
                             1e-3, 448.0, -448.0, 7.0] * 2), (4, 1))
    tiny = np.full((2, 32), 1e-9)
    out = []
    for dtype in (mx.float32, mx.bfloat16):
        out += [mx.array(wide).astype(dtype), mx.array(ties).astype(dtype), mx.array(tiny).astype(dtype)]
    return out


@pytest.mark.parametrize("ours,theirs,block", [
    ("fp8", "fake_quant_fp8_ue8m0", 32),
    ("fp4", "fake_quant_fp4_ue8m0", 32),
    ("fp4_e4m3", "fake_quant_fp4_e4m3", 16),
])
def test_roundings_equal_mlx_vlm_bit_for_bit(ours, theirs, block):
    ref = vlm_reference.load("fakequant")
    for x in _tensors():
        got, want = getattr(fq, ours)(x, block), getattr(ref, theirs)(x, block)
        assert got.dtype == want.dtype == x.dtype
        g = np.array(got.astype(mx.float32)).view(np.uint32)
        w = np.array(want.astype(mx.float32)).view(np.uint32)
        assert (g == w).all(), f"{ours}: {(g != w).sum()} of {g.size} values differ"


def test_fp4_is_the_e2m1_grid_with_ties_to_even():
    x = mx.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 6.0, -0.3, -2.6] + [0.0] * 21)
    # One block whose amax is 6: the scale is 1 and the values land on the grid itself.
    got = fq.fp4(x).tolist()[:11]
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -3.0]


@pytest.mark.parametrize("value,expected", [(None, "kv"), ("kv", "kv"), ("0", "off"), ("off", "off"),
                                            ("all", "all"), ("1", "all")])
def test_the_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(fq.ENV, raising=False)
    else:
        monkeypatch.setenv(fq.ENV, value)
    assert fq.mode() == expected
    x = mx.array(np.random.default_rng(1).standard_normal((2, 64)), mx.float32)
    assert mx.array_equal(fq.window_kv(x), x).item() == (expected == "off")
    assert mx.array_equal(fq.linear_input(x), x).item() == (expected != "all")


def test_an_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setenv(fq.ENV, "fp8")
    with pytest.raises(ValueError, match="MLX_DSV4_FAKE_QUANT='fp8'"):
        fq.mode()
