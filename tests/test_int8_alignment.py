"""Issue 25: the int8pack kernel only ever sees 64-byte aligned weights, however they were loaded.

On AVX-512 hosts ``_weight_int8pack_mm`` faults on a weight as it lies in a safetensors file (8-byte
aligned); these tests load such a weight through the project's path and run the kernel on it. The kernel
tests run in a forked child (``@pytest.mark.isolated``), so a regression fails them by name instead of
killing the suite.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoglm_train.quant.int8_modules import Int8PackedLinear
from autoglm_train.utils.aligned import ALIGNMENT, aligned, is_aligned


def _misaligned_int8_file(path, out_features: int = 48, in_features: int = 64) -> dict[str, torch.Tensor]:
    """Write an int8 weight and its scales so that, loaded, the weight lies at 8 mod 16 bytes: the offsets on which
    the AVX-512 kernel faults (8, 24, 40, 56 mod 64; 0, 16, 32, 48 happen to work). A float32 tensor of a chosen
    length sits ahead of the weight in the file (safetensors orders float32 before int8) to move it there."""
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scale = torch.rand(out_features) / 100 + 1e-3
    for pad in range(1, 17):
        save_file({"a_pad": torch.zeros(pad), "b_weight": weight, "c_scale": scale}, str(path))
        loaded = load_file(str(path))
        if loaded["b_weight"].data_ptr() % 16 == 8:
            return loaded
    raise AssertionError("no pad length puts the weight at 8 mod 16 bytes")


def test_aligned_copies_only_what_is_misaligned():
    storage = torch.arange(64 + 32, dtype=torch.int8)
    off = storage[8:88].view(8, 10)
    assert not is_aligned(off)
    fixed = aligned(off)
    assert is_aligned(fixed) and torch.equal(fixed, off) and fixed.data_ptr() != off.data_ptr()
    assert aligned(fixed) is fixed  # already aligned: no copy
    strided = torch.zeros(16, 16).t()
    assert aligned(strided).is_contiguous() and torch.equal(aligned(strided), strided)


def test_a_loaded_int8_weight_is_misaligned_and_the_packed_linear_realigns_it(tmp_path):
    loaded = _misaligned_int8_file(tmp_path / "w.safetensors")
    assert loaded["b_weight"].data_ptr() % ALIGNMENT == 8 or loaded["b_weight"].data_ptr() % 16 == 8
    linear = Int8PackedLinear(loaded["b_weight"], loaded["c_scale"])
    assert is_aligned(linear.qdata) and is_aligned(linear.scale)
    assert torch.equal(linear.qdata, loaded["b_weight"])


@pytest.mark.isolated
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_int8pack_kernel_runs_on_a_weight_loaded_from_safetensors(tmp_path, rows):
    loaded = _misaligned_int8_file(tmp_path / "w.safetensors")
    linear = Int8PackedLinear(loaded["b_weight"], loaded["c_scale"])
    x = torch.randn(rows, loaded["b_weight"].shape[1])
    got = linear(x)  # the int8pack kernel (rows <= PACKED_MAX_ROWS)
    want = x.bfloat16().float() @ (loaded["b_weight"].float() * loaded["c_scale"].bfloat16().float()[:, None]).t()
    assert got.shape == (rows, loaded["b_weight"].shape[0])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
