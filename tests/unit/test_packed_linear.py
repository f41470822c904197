"""oneDNN's packed bf16 linear (afd.kernels.packed_linear): values, the per-weight cache, what it refuses, the tuner."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afd.kernels import linear_form, packed_linear, tuning
from attn_nodes.model import AttentionHalfModel
from tests.checkpoints import build_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def needs_onednn_bf16():
    if not packed_linear.available():
        pytest.skip("this torch build has no oneDNN bf16 linear (or AFD_PACKED_LINEAR=off)")


def _bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize(("rows", "inner", "out"), [(1, 1024, 1536), (8, 512, 1000), (32, 1024, 3000), (70, 96, 5)])
def test_packed_form_is_the_exact_product_up_to_one_rounding(rows: int, inner: int, out: int) -> None:
    x, w = _bf16(rows, inner, seed=1), _bf16(out, inner, seed=2)
    packed_linear.allow([w])
    y = packed_linear.linear(x, w)
    exact = x.double() @ w.double().T
    assert y.shape == (rows, out) and y.dtype == torch.bfloat16
    # fp32 sums in another order than the exact one, then one bf16 rounding (2^-8 relative) of the result
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2 * inner**0.5).all()
    assert torch.equal(linear_form("packed", x, w), y)  # the tuner's and the benchmarks' entry point


def test_each_weight_is_packed_once_and_dropped_with_it() -> None:
    before = packed_linear.packed_count()
    w = _bf16(64, 128)
    twin = w.clone()  # equal values, another weight: its own copy
    packed_linear.allow([w, twin])
    first = packed_linear.packed_weight(w)
    assert packed_linear.packed_weight(w) is first  # later calls reuse the packed copy
    assert packed_linear.packed_count() == before + 1
    assert packed_linear.packed_weight(twin) is not first
    assert packed_linear.packed_count() == before + 2
    del w, twin, first
    gc.collect()
    assert packed_linear.packed_count() == before


def test_only_allowed_weights_are_packed_and_others_are_refused_with_the_reason() -> None:
    stack = _bf16(4, 16, 32)
    packed_linear.allow([stack, stack.float()])  # not bf16 matrices: ignored
    expert = stack[1]  # a per-expert slice, made per call in the experts' torch path: never allowed
    assert not packed_linear.packable(expert) and not packed_linear.packable(stack)
    with pytest.raises(ValueError, match=r"declared long-lived .* allowed False"):
        packed_linear.linear(_bf16(2, 32), expert)
    kept = stack[1].clone()
    packed_linear.allow([kept])
    assert packed_linear.packable(kept)
    assert "packed" in tuning.candidates(packable=True)
    assert "packed" not in tuning.candidates(packable=False)


def test_the_engine_linear_tunes_allowed_and_other_weights_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.linear asks the tuner with packable=False for a weight not allowed: the choices do not mix."""
    from afd import kernels

    tuning.reset()
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    try:
        x, w, kept = _bf16(4, 32), _bf16(2, 16, 32), _bf16(16, 32)
        packed_linear.allow([kept])
        kernels.linear(x, w[0])
        kernels.linear(x, kept)
        assert set(tuning.choices()) == {"4x16x32 unpacked", "4x16x32"}
    finally:
        tuning.reset()


def test_the_models_projections_and_lm_head_are_allowed(tmp_path: Path) -> None:
    model = AttentionHalfModel.load(build_checkpoint("qwen3_moe", tmp_path / "m", seed=3), 64, torch.bfloat16)
    assert packed_linear.packable(model.lm_head)
    assert all(packed_linear.packable(layer.attention.qkv) for layer in model.layers)
    assert all(packed_linear.packable(layer.attention.o_proj) for layer in model.layers)
    assert not packed_linear.packable(model.final_norm)  # a vector: never multiplied as a weight


def test_the_switch_removes_the_form() -> None:
    code = "from afd.kernels import packed_linear, tuning; print(packed_linear.available(), tuning.candidates())"
    env = {**os.environ, packed_linear.DISABLE_ENV: "off"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[0] == "False" and "packed" not in out.stdout
