"""scripts/kernel_resources.py compiles the decode kernels (the base projection fused with its
LoRA among them), and the slot-dense kernel at prefill sizes, for sm_90 on this CPU machine
(Triton's own compiler and the ptxas / cuobjdump its wheel ships; nothing runs). The facts the
kernels' defaults were chosen for must hold in the compiled code: no spilled registers in bf16,
tensor-core dots and a pipelined K loop where the slot-dense kernel shrinks, 4 pipeline stages
within the shared memory for the base projection fused with its LoRA, the split-K shrink
launch in the default decode call from D_in 1024 up, and the
shrink launch over token tiles at prefill sizes.

The script runs in a subprocess: it turns the Triton interpreter off for its own process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists(),
                    reason="this triton wheel ships no CUDA tools")
def test_lora_kernels_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), "--json", str(out)], check=True,
                   capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    shapes = {r["shape"] for r in rows if r["step"] == "decode"}
    prefill = {r["shape"] for r in rows if r["step"] == "prefill"}
    assert len(shapes) == 4 and len(prefill) == 2
    assert all(r["spill_bytes"] == 0 for r in rows), [r for r in rows if r["spill_bytes"]]
    dense = [r for r in rows if r["call"].startswith("dense")]
    assert dense and all(r["mma"] in ("mma.sync", "wgmma") for r in dense)
    # Every shape's D_in is >= 1024: the default call splits the shrink, one launch each.
    for shape in shapes:
        default = [r["kernel"] for r in rows if r["shape"] == shape and r["call"] == "dense"]
        assert default == ["_lora_dense_shrink_kernel", "_lora_dense_kernel"], (shape, default)
        one = [r for r in rows if r["shape"] == shape and r["call"] == "dense split_k=1"]
        assert [r["kernel"] for r in one] == ["_lora_dense_kernel"] and one[0]["pipelined"]
        # The base projection with its LoRA: one launch, its K loop (base and shrink) pipelined.
        fused = [r for r in rows if r["shape"] == shape and r["call"] == "dense_base"]
        assert [r["kernel"] for r in fused] == ["_lora_dense_base_kernel"] and fused[0]["pipelined"]
        # 16-bit tiles get the deeper pipeline the H200 sweep chose, within sm_90's 227 KB.
        assert "num_stages=4" in fused[0]["tiles"] and fused[0]["shared_bytes"] <= 227 * 1024, fused[0]
        split = [r["kernel"] for r in rows if r["shape"] == shape and r["call"] == "dense_base split_k=4"]
        assert split == ["_lora_dense_shrink_kernel", "_lora_dense_base_kernel"], (shape, split)
    for shape in prefill:
        assert [(r["call"], r["kernel"]) for r in rows if r["shape"] == shape] == [
            ("dense", "_lora_dense_shrink_kernel"), ("dense", "_lora_dense_kernel")]
    assert all(r["pipelined"] for r in rows if r["kernel"] == "_lora_dense_shrink_kernel")
