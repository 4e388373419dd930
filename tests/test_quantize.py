"""Weight-only quantization of the experts: the error bound, the packing, the bytes, torchao's int8 codes,
the quantized layer against a float64 reference, calibration coverage, and bad input."""

import contextlib
import io
import warnings

import pytest
import torch

from moe_ref.moe import MoE
from moe_ref.quantize import (CalibrationWarning, QuantizedExperts, calibration_counts, calibration_coverage,
                              dequantize_tensor, expert_bytes, pack_int4, predicted_bytes, quantize_experts,
                              quantize_tensor, unpack_int4)

from conftest import ffn64

FORMATS = [(8, None), (8, 32), (8, 16), (4, None), (4, 64), (4, 32), (4, 16)]


def bound64(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Half the scale of each weight's group, by a float64 loop over (matrix, column, group)."""
    qmax = 2 ** (bits - 1) - 1
    E, d_in, d_out = w.shape
    g = d_in if group is None else group
    out = torch.empty(w.shape, dtype=torch.float64)
    for e in range(E):
        for j in range(d_out):
            for start in range(0, d_in, g):
                block = w[e, start:start + g, j].double()
                out[e, start:start + g, j] = block.abs().max() / qmax / 2
    return out


@pytest.mark.parametrize("bits,group", FORMATS)
def test_error_within_half_a_scale(bits, group):
    torch.manual_seed(0)
    w = torch.randn(3, 64, 10)
    w[0, 5, 2] = 40.0  # an outlier inflates its own group's scale only
    w[1, :, 3] = 0.0  # an all-zero column stays exact
    codes, scales = quantize_tensor(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= qmax
    err = (w.double() - dequantize_tensor(codes, scales).double()).abs()
    bound = bound64(w, bits, group)
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert float(err[1, :, 3].max()) == 0.0
    # the bound is attained up to rounding: some weight lands near the middle between two codes
    assert float((err / bound.clamp_min(1e-30)).max()) > 0.9


def test_smaller_groups_shrink_the_error():
    torch.manual_seed(1)
    w = torch.randn(2, 128, 16) * torch.linspace(0.1, 3.0, 128).unsqueeze(-1)  # rows of different scales
    errors = []
    for group in (None, 64, 32, 16):
        codes, scales = quantize_tensor(w, 4, group)
        errors.append(float((w - dequantize_tensor(codes, scales)).pow(2).mean()))
    assert errors == sorted(errors, reverse=True)


def test_int4_packing_round_trips_and_halves():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert int(packed[0, 0]) == (-8 + 8) | ((-7 + 8) << 4)  # low nibble = even column
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits,group", FORMATS)
def test_bytes_match_the_formula(bits, group):
    moe = MoE(64, 128, 4, 2, activation="swiglu")
    q = quantize_experts(moe, bits, group)
    expected = 0
    for d_in, d_out in [(64, 128), (64, 128), (128, 64)]:  # w_in, w_up, w_out
        g = d_in if group is None else group
        expected += predicted_bytes(4 * d_in * d_out, bits, g)
    assert expert_bytes(q) == expected
    assert expert_bytes(moe) == 4 * 4 * 3 * 64 * 128
    # int8 per channel: 1 byte a weight plus a float32 per (matrix, column)
    if (bits, group) == (8, None):
        assert expected == 4 * 3 * 64 * 128 + 4 * 4 * (128 + 128 + 64)


def test_full_range_codes_equal_torchao_int8():
    pytest.importorskip("torchao")
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 24, bias=False)
    w = linear.weight.detach().clone()  # [out, in]
    quantize_(linear, Int8WeightOnlyConfig())
    ours, scales = quantize_tensor(w.t().unsqueeze(0), 8, None, full_range=True)  # input-major [1, in, out]
    theirs = linear.weight.qdata.t()  # [in, out]
    torch.testing.assert_close(scales[0, 0], linear.weight.scale.flatten())
    # equal codes, except at the exact tie w / s = -127.5 (each column's negative maximum), which torchao
    # rounds to -127 (it multiplies by 1 / s) and round-half-to-even to -128: both within half a scale
    tie = (w.t() / scales[0, 0]).abs() > 127.5 - 1e-4
    assert torch.equal(ours[0][~tie], theirs[~tie])
    assert int((ours[0].int() - theirs.int()).abs().max()) <= 1


@pytest.mark.parametrize("impl", ["grouped", "naive"])
def test_quantized_layer_equals_float64_with_dequantized_weights(impl):
    torch.manual_seed(3)
    moe = MoE(16, 24, 4, 2, activation="swiglu", impl=impl).eval()
    q = quantize_experts(moe, 4, 8)
    assert isinstance(q.experts, QuantizedExperts) and not list(q.experts.parameters())
    assert torch.equal(q.router.gate.weight, moe.router.gate.weight)  # the router stays float32
    x = torch.randn(40, 16)
    y = q(x)
    r = q.last_routing
    expected = torch.zeros(40, 16, dtype=torch.float64)
    for name in ("w_in", "w_up", "w_out"):
        codes, scales = quantize_tensor(getattr(moe.experts, name), 4, 8)
        q_w = dequantize_tensor(codes, scales)
        torch.testing.assert_close(getattr(q.experts, name), q_w, rtol=0, atol=0)
    for t in range(40):
        for j in range(2):
            e = int(r.expert_indices[t, j])
            w = [getattr(q.experts, n)[e] for n in ("w_in", "w_up", "w_out")]
            expected[t] += float(r.combine_weights[t, j]) * ffn64(x[t:t + 1], w[0], w[1], w[2], "swiglu")[0]
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


def test_quantize_leaves_the_original_alone():
    moe = MoE(16, 24, 4, 2)
    before = moe.experts.w_in.detach().clone()
    quantize_experts(moe, 8)
    assert isinstance(moe.experts.w_in, torch.nn.Parameter) and torch.equal(moe.experts.w_in, before)


@pytest.mark.parametrize("bits", [3, 16, 2, True, "8"])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_experts(MoE(16, 24, 4, 2), bits)


@pytest.mark.parametrize("group", [5, 48, 0, -8])
def test_group_size_must_divide(group):
    with pytest.raises(ValueError, match="group_size"):
        quantize_experts(MoE(16, 32, 4, 2), 8, group)


def test_quantize_twice_and_no_moe():
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(quantize_experts(MoE(16, 32, 4, 2), 8), 8)
    with pytest.raises(ValueError, match="no MoE"):
        quantize_experts(torch.nn.Linear(3, 3), 8)


def starved_moe(dead: int) -> MoE:
    """A layer whose expert ``dead`` no positive input can reach: its gate row is very negative."""
    torch.manual_seed(4)
    moe = MoE(8, 16, 4, 2)
    with torch.no_grad():
        moe.router.gate.weight[dead] = -10.0
    return moe


def test_calibration_counts_equal_a_hand_count():
    moe = starved_moe(2)
    batches = [torch.randn(30, 8).abs() for _ in range(3)]
    counts = calibration_counts(moe, batches)
    expected = torch.zeros(4, dtype=torch.long)
    for x in batches:
        logits = x @ moe.router.gate.weight.t()
        for row in logits.topk(2, dim=-1).indices:
            expected[row] += 1
    assert torch.equal(counts[0], expected) and int(counts[0, 2]) == 0 and int(counts.sum()) == 180


def test_calibration_coverage_names_starved_experts():
    moe = starved_moe(2)
    batches = [torch.randn(30, 8).abs()]
    with pytest.raises(ValueError, match="0/2"):
        calibration_coverage(moe, batches)
    with pytest.warns(CalibrationWarning, match="0/2"):
        calibration_coverage(moe, batches, on_missing="warn")
    assert int(calibration_coverage(moe, batches, on_missing="ignore")[0, 2]) == 0
    with pytest.raises(ValueError, match="batches"):
        calibration_counts(moe, [])
    with pytest.raises(ValueError, match="on_missing"):
        calibration_coverage(moe, batches, on_missing="skip")
