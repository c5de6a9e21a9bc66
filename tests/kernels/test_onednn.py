"""kernels.onednn: packed oneDNN linears where this torch build and this CPU run them, a clear
refusal elsewhere (bf16 packing needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT, which AVX2-only hosts lack)."""

import pytest
import torch

from kernels import onednn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packs_exactly_where_it_says_it_can(dtype):
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 40, generator=gen).to(dtype), torch.randn(5, 40, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype)
    if not onednn.can_pack(weight):
        assert dtype == torch.float16 or not onednn.available(dtype)
        with pytest.raises(ValueError, match=f"cannot pack a {dtype}"):
            onednn.pack(weight)
        return
    got = onednn.linear(x, onednn.pack(weight), bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), torch.nn.functional.linear(x.float(), weight.float(), bias.float()),
                               atol=tol * 10, rtol=tol)


def test_bf16_packing_follows_the_cpu():
    """PyTorch packs bf16 weights for oneDNN only on a CPU with AVX-512 (BW, VL, DQ; what ATen's
    AVX512 capability requires) or AVX-NE-CONVERT; elsewhere `available` must say no, not raise."""
    if not onednn.available():
        pytest.skip("this torch build has no oneDNN linears")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert onednn.available(torch.bfloat16)
    elif not onednn.available(torch.bfloat16):
        with pytest.raises(RuntimeError, match="bf16"):
            torch.ops.mkldnn._reorder_linear_weight(torch.randn(8, 16).bfloat16())
