"""The native CPU kernels (afd.kernels.native) against torch, their fallback, and the form tuner.

The build happens once per machine (make setup does it); where it cannot happen here the kernel tests
skip with the reason and the fallback tests still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from afd.kernels import linear, native, routed_experts_swiglu, tuning
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from ffn_nodes.experts import StackedExperts
from tests.checkpoints import build_checkpoint
from tests.engines import inprocess_engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernels():
    module = native.load()
    if module is None:
        pytest.skip(f"native kernels unavailable here: {native.failure()}")
    return module


def _bf16(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize(("rows", "inner", "out"), [(1, 1024, 1536), (3, 1000, 37), (8, 512, 1024), (70, 96, 5)])
def test_linear_matches_torch_up_to_one_rounding(kernels, rows: int, inner: int, out: int) -> None:
    """Tails in every dimension (inner not a multiple of 32, out not of 4, rows not of 4): each output is the
    fp32 dot product rounded once to bf16, so it lies within one bf16 step of torch's and of the exact value."""
    x, w = _bf16(rows, inner, seed=1), _bf16(out, inner, scale=0.05, seed=2)
    got, expected = kernels.linear_bf16(x, w), F.linear(x, w)
    exact = x.double() @ w.double().T
    assert got.shape == (rows, out) and got.dtype == torch.bfloat16
    step = exact.abs().clamp_min(1e-3) * 2**-7  # one bf16 ulp (8 significant bits) of each value
    assert ((got.double() - exact).abs() <= step).all()
    assert ((got.double() - expected.double()).abs() <= step).all()
    assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("inner", [96, 512, 1024])
def test_an_output_does_not_depend_on_which_tile_row_computes_it(kernels, rows: int, inner: int) -> None:
    """Weight rows are read in interleaved groups (one row per 4 KB page per tile) and the rest as adjacent rows:
    dropping the first 5 weight rows moves every output to another group, tile slot or tail, and each must stay
    bit-identical (the fused experts' equality with the per-expert path rests on it)."""
    x, w = _bf16(rows, inner, seed=11), _bf16(1043, inner, scale=0.05, seed=12)
    full, shifted = kernels.linear_bf16(x, w), kernels.linear_bf16(x, w[5:].contiguous())
    assert torch.equal(full[:, 5:], shifted)


def test_linear_refuses_bad_inputs_with_the_reason(kernels) -> None:
    x, w = _bf16(2, 64), _bf16(8, 64)
    with pytest.raises(RuntimeError, match="weight must be bfloat16"):
        kernels.linear_bf16(x, w.float())
    with pytest.raises(RuntimeError, match="do not multiply"):
        kernels.linear_bf16(x, _bf16(8, 32))
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        kernels.linear_bf16(_bf16(64, 2).T, w)


@pytest.mark.parametrize("hidden", [256, 200])
@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
def test_fused_experts_equal_the_torch_path_bit_for_bit(kernels, tokens: int, hidden: int) -> None:
    """Same rounding steps and the same order of additions as StackedExperts' looped torch path, so the
    outputs are identical, including -1 (held elsewhere) slots and tokens sent to no local expert; hidden 200
    leaves columns past the last 16 for the scalar end of the weighted sum."""
    experts, inter = 8, 96
    gate_up = _bf16(experts, 2 * inter, hidden, scale=0.06, seed=3)
    down = _bf16(experts, hidden, inter, scale=0.1, seed=4)
    g = torch.Generator().manual_seed(tokens)
    h = _bf16(tokens, hidden, seed=5)
    ids = torch.randint(-1, experts, (tokens, 3), generator=g)
    weights = torch.rand(tokens, 3, generator=g)
    torch_out = _bf16(tokens, hidden, seed=6)
    fused_out = torch_out.clone()
    reference = StackedExperts(gate_up, down, "looped")
    reference.forward(h, ids, weights, torch_out)
    counts = kernels.moe_swiglu_bf16(h, ids, weights, gate_up, down, fused_out)
    assert torch.equal(fused_out, torch_out)
    assert counts.tolist() == reference.expert_tokens


def test_fused_experts_refuse_an_expert_id_out_of_range(kernels) -> None:
    gate_up, down = _bf16(2, 16, 32), _bf16(2, 32, 8)
    out = _bf16(1, 32)
    before = out.clone()
    with pytest.raises(RuntimeError, match="expert id 2 is outside"):
        kernels.moe_swiglu_bf16(_bf16(1, 32), torch.tensor([[2]]), torch.ones(1, 1), gate_up, down, out)
    assert torch.equal(out, before)  # refused before anything was added


def test_stacked_experts_take_the_fused_kernel_in_bf16_decode(kernels) -> None:
    gate_up, down = _bf16(4, 64, 32, scale=0.1), _bf16(4, 32, 32, scale=0.1)
    experts = StackedExperts(gate_up, down)
    h, ids, weights = _bf16(2, 32), torch.tensor([[0, 3], [3, -1]]), torch.rand(2, 2)
    fused = torch.zeros(2, 32, dtype=torch.bfloat16)
    experts.forward(h, ids, weights, fused)
    looped = torch.zeros(2, 32, dtype=torch.bfloat16)
    StackedExperts(gate_up, down, "looped").forward(h, ids, weights, looped)
    assert torch.equal(fused, looped)
    assert experts.expert_tokens == [1, 0, 0, 2] and experts.experts_hit == 2
    # Prefill-sized batches keep the torch paths on AVX2; with AVX512-BF16 (or AMX) the fused call serves them
    # (100 tokens to expert 0); other dtypes always keep them.
    many, one_each = _bf16(100, 32), torch.zeros(100, 1, dtype=torch.long)
    fused_many, looped_many = many.clone(), many.clone()
    served = routed_experts_swiglu(many, one_each, torch.ones(100, 1), gate_up, down, fused_many)
    assert served == ([100, 0, 0, 0] if kernels.available_isa() == "avx512_bf16" else None)
    if served is not None:  # the same values as the torch path up to the roundings of its two products
        StackedExperts(gate_up, down, "looped").forward(many, one_each, torch.ones(100, 1), looped_many)
        step = looped_many.double().abs().clamp_min(0.25) * 2**-6
        assert ((fused_many.double() - looped_many.double()).abs() <= step).all()
    h32 = h.float()
    assert routed_experts_swiglu(h32, ids, weights, gate_up.float(), down.float(), h32.clone()) is None


def test_busy_experts_take_the_library_matmul_with_the_torch_paths_values(kernels) -> None:
    """Without AMX, an expert with 32 or more tokens runs its projections through torch's matmul inside the fused
    call: with two such experts and two lightly loaded ones (vector tiles) in one call, the busy experts' tokens get
    exactly the torch path's values (its F.linear above 64 rows, the same call) and the rest within one rounding."""
    if kernels.available_isa() != "avx512_bf16" or kernels.matrix_isa() == "amx_bf16":
        pytest.skip(f"the library path serves AVX512-BF16 CPUs without AMX (here {native.describe()})")
    gate_up, down = _bf16(4, 128, 64, scale=0.1, seed=3), _bf16(4, 64, 64, scale=0.1, seed=4)
    h = _bf16(203, 64, seed=5)
    ids = torch.tensor([0] * 100 + [1] * 100 + [2, 3, 2]).unsqueeze(1)
    weights = torch.rand(203, 1, generator=torch.Generator().manual_seed(6))
    fused = torch.zeros(203, 64, dtype=torch.bfloat16)
    assert routed_experts_swiglu(h, ids, weights, gate_up, down, fused) == [100, 100, 2, 1]
    reference = torch.zeros(203, 64, dtype=torch.bfloat16)
    for expert in range(4):  # each expert's rows through the torch path alone: above 64 rows it is F.linear
        rows = ids[:, 0] == expert
        part = torch.zeros(int(rows.sum()), 64, dtype=torch.bfloat16)
        StackedExperts(gate_up, down, "looped").forward(h[rows], ids[rows], weights[rows], part)
        reference[rows] = part
    assert torch.equal(fused[:200], reference[:200])
    step = reference[200:].double().abs().clamp_min(0.25) * 2**-6
    assert ((fused[200:].double() - reference[200:].double()).abs() <= step).all()


def test_fused_experts_reuse_their_scratch_rows_without_stale_values(kernels) -> None:
    """The fused call keeps its working rows between calls: a large call, a small one and the large one again give
    the large call's values both times, and the small one its own (stale rows would leak into either)."""
    gate_up, down = _bf16(8, 64, 32, scale=0.1, seed=7), _bf16(8, 32, 32, scale=0.1, seed=8)
    big_h, small_h = _bf16(60, 32, seed=9), _bf16(3, 32, seed=10)
    big_ids = torch.randint(-1, 8, (60, 2), generator=torch.Generator().manual_seed(11))
    small_ids = torch.tensor([[1, 5], [5, -1], [7, 1]])

    def run(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        weights = torch.linspace(0.1, 1.0, ids.numel()).view(ids.shape)
        assert kernels.moe_swiglu_bf16(h, ids, weights, gate_up, down, out).sum().item() == int((ids >= 0).sum())
        return out

    first = run(big_h, big_ids)
    small = run(small_h, small_ids)
    assert torch.equal(run(big_h, big_ids), first)
    looped = torch.zeros_like(small_h)
    weights = torch.linspace(0.1, 1.0, small_ids.numel()).view(small_ids.shape)
    StackedExperts(gate_up, down, "looped").forward(small_h, small_ids, weights, looped)
    assert torch.equal(small, looped)


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_avx2_path_matches_the_avx512_path(kernels, tmp_path: Path) -> None:
    """AFD_NATIVE_ISA=avx2 runs the AVX2 + FMA path on this CPU: same results within one rounding."""
    x, w = _bf16(5, 200, seed=7), _bf16(9, 200, scale=0.05, seed=8)
    torch.save({"x": x, "w": w}, tmp_path / "inputs.pt")
    code = (
        "import torch; from afd.kernels import native; m = native.load(); "
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r}); "
        f"torch.save(m.linear_bf16(d['x'], d['w']), {str(tmp_path / 'out.pt')!r}); print(m.available_isa())"
    )
    assert _run(code, AFD_NATIVE_ISA="avx2") == "avx2"
    avx2 = torch.load(tmp_path / "out.pt")
    exact = x.double() @ w.double().T
    assert ((avx2.double() - exact).abs() <= exact.abs().clamp_min(1e-3) * 2**-7).all()


def test_disabled_native_kernels_fall_back_to_torch() -> None:
    """AFD_NATIVE_KERNELS=0: load() says why, linear still computes, and the fused expert call declines."""
    code = (
        "import torch; from afd.kernels import native, linear, routed_experts_swiglu as r; b = torch.bfloat16; "
        "x = torch.ones(1, 8, dtype=b); w = torch.ones(4, 8, dtype=b); y = linear(x, w); "
        "g = torch.ones(1, 8, 8, dtype=b); d = torch.ones(1, 8, 4, dtype=b); ids = torch.zeros(1, 1).long(); "
        "print(native.load(), native.failure(), y.tolist(), r(x, ids, torch.ones(1, 1), g, d, x))"
    )
    assert _run(code, AFD_NATIVE_KERNELS="0") == "None AFD_NATIVE_KERNELS=0 [[8.0, 8.0, 8.0, 8.0]] None"


def test_the_tuner_keeps_the_fastest_form_and_measures_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tuning.reset()
    monkeypatch.setattr(tuning, "candidates", lambda packable=True: ("native", "library", "stationary"))
    monkeypatch.setattr(tuning, "ROTATION_BYTES", 1 << 16)
    delays = {"native": 2e-4, "library": 0.0, "stationary": 1e-4}
    calls: list[str] = []

    def run(form: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(form)
        time.sleep(delays[form])
        return x

    assert tuning.choose_linear_form(3, 16, 32, run) == "library"  # far faster than native, the preferred form
    measured = len(calls)
    assert measured > 0 and set(calls) == set(delays)
    assert tuning.choose_linear_form(4, 16, 32, run) == "library"  # 3 and 4 rows share the bucket of 4
    assert len(calls) == measured
    assert tuning.choices() == {"4x16x32": "library"}
    # 10 % faster: inside the margin, the preferred form stays (sleeps of a millisecond, so that a busy machine's
    # oversleeping stays small beside the 10 %)
    delays.update(native=1.1e-3, library=1e-3, stationary=1e-3)
    assert tuning.choose_linear_form(1, 64, 32, run) == "native"
    measured = len(calls)
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    assert tuning.choose_linear_form(1, 16, 32, run) == "native"  # the fixed preference, not measured
    assert len(calls) == measured
    tuning.reset()


def test_linear_adds_the_bias_and_keeps_torch_for_other_dtypes() -> None:
    x, w, b = _bf16(2, 64), _bf16(8, 64, scale=0.1), _bf16(8)
    assert torch.allclose(linear(x, w, b).float(), F.linear(x, w, b).float(), atol=0.05, rtol=0.02)
    x32, w32 = x.float(), w.float()
    assert torch.equal(linear(x32, w32), F.linear(x32, w32))


def test_bf16_engine_tokens_agree_with_and_without_native_kernels(
    kernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy decode of a tiny MoE in bf16, 2 FFN shards, native path against the pure-torch fallback.

    Linear, experts and norms give the torch path's results bit for bit or to one rounding; decode attention
    sums in another order than torch's flash attention (one bf16 step apart on a few outputs, equally far from
    the exact result: see the attention test), so on this tiny random model, whose top logits nearly tie, a
    continuation may part after a few tokens. A wrong kernel parts at the first decode step."""
    model_dir = build_checkpoint("qwen3_moe", tmp_path / "m", seed=3)
    prompts = [[5, 9, 11, 40], [7], list(range(1, 30)), [100, 3, 77], [12] * 10]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    config = EngineConfig(dtype="bfloat16")
    fast = inprocess_engine(model_dir, 2, config).generate(prompts, params)
    monkeypatch.setattr(native, "load", lambda verbose=False: None)
    tuning.reset()
    try:
        eager = inprocess_engine(model_dir, 2, config).generate(prompts, params)
    finally:
        tuning.reset()
    leading = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(fast, eager, strict=True)
    ]
    assert min(leading) >= 3, leading
    assert sum(leading) >= 0.8 * len(prompts) * params.max_tokens, leading


@pytest.mark.parametrize("dim", [64, 72])
def test_decode_attention_matches_torch_flash_attention(kernels, dim: int) -> None:
    """Against gather + scaled_dot_product_attention (GQA 16/4 heads, padded contexts): every output within one
    bf16 step of the values summed, and as close to the exact (float64) attention as torch's is. Head dim 72 takes
    the one-head-at-a-time kernel with a scalar end of each dot product."""
    seqs, heads, kv_heads, ctx = 3, 16, 4, 70
    cache = _bf16(400, 2 * kv_heads * dim, seed=13)
    lens = torch.tensor([70, 5, 33])
    slots = torch.randint(0, 400, (seqs, ctx), generator=torch.Generator().manual_seed(14))
    q = _bf16(seqs, heads, dim, seed=15)
    got = kernels.decode_attention_bf16(q, cache, slots, lens, 0, kv_heads * dim, kv_heads, 0.125)
    context = cache.index_select(0, slots.view(-1)).view(seqs, ctx, -1)
    k = context[..., : kv_heads * dim].reshape(seqs, ctx, kv_heads, dim).transpose(1, 2)
    v = context[..., kv_heads * dim :].reshape(seqs, ctx, kv_heads, dim).transpose(1, 2)
    mask = (torch.arange(ctx)[None, :] < lens[:, None])[:, None, None, :]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
        return out.squeeze(2).reshape(seqs, heads * dim)

    expected = attention(q, k, v)
    exact = attention(q.double(), k.double(), v.double())
    # Outputs near zero are sums of terms near 1 that cancel: their error is a step of those terms, not of the sum.
    step = expected.double().abs().clamp_min(0.5) * 2**-7
    assert ((got.double() - expected.double()).abs() <= step).all()
    assert (got.double() - exact).abs().mean() <= 1.1 * (expected.double() - exact).abs().mean()
    with pytest.raises(RuntimeError, match="context length 71 of sequence 0"):
        kernels.decode_attention_bf16(q, cache, slots, torch.tensor([71, 5, 33]), 0, 256, kv_heads, 0.125)
    with pytest.raises(RuntimeError, match="cache slot 400 is outside"):
        kernels.decode_attention_bf16(q, cache, torch.full((seqs, ctx), 400), lens, 0, 256, kv_heads, 0.125)


def test_decode_attention_of_grouped_heads_equals_one_head_at_a_time(kernels) -> None:
    """The GQA path (the query heads of one kv head together, each K/V row read once) gives exactly what the
    per-head path gives: the same cache with every kv head repeated once per query head takes the latter."""
    seqs, heads, kv_heads, dim, ctx = 5, 16, 4, 64, 40
    group = heads // kv_heads
    cache = _bf16(300, 2 * kv_heads * dim, seed=21)
    lens = torch.tensor([40, 1, 17, 33, 8])
    slots = torch.randint(0, 300, (seqs, ctx), generator=torch.Generator().manual_seed(22))
    q = _bf16(seqs, heads, dim, seed=23)
    grouped = kernels.decode_attention_bf16(q, cache, slots, lens, 0, kv_heads * dim, kv_heads, 0.125)
    k, v = cache[:, : kv_heads * dim].view(300, kv_heads, dim), cache[:, kv_heads * dim :].view(300, kv_heads, dim)
    repeated = torch.cat([k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)], 1).reshape(300, -1)
    per_head = kernels.decode_attention_bf16(q, repeated.contiguous(), slots, lens, 0, heads * dim, heads, 0.125)
    assert torch.equal(grouped, per_head)


@pytest.mark.parametrize(
    ("shape", "weight_shape"),
    [((1, 1024), (1024,)), ((7, 1000), (1000,)), ((3, 20, 64), (20, 64)), ((5, 4, 8), (8,)), ((64, 1024), (1024,))],
)
def test_rms_norm_is_bit_identical_to_torch(kernels, shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> None:
    x, weight = _bf16(*shape, seed=9), (_bf16(*weight_shape, scale=0.1, seed=10) + 1)
    assert torch.equal(kernels.rms_norm_bf16(x, weight, 1e-6), weight * F.rms_norm(x, (shape[-1],), None, 1e-6))


def test_rms_norm_reads_strided_heads_in_place(kernels) -> None:
    """q/k norm reads [tokens, heads, head_dim] as a view into the fused qkv output (rows strided)."""
    qkv = _bf16(3, 2000, seed=11)
    heads = qkv[:, :1280].view(3, 20, 64)
    weight = _bf16(20, 64, seed=12)
    assert not heads.is_contiguous()
    assert torch.equal(kernels.rms_norm_bf16(heads, weight, 1e-6), weight * F.rms_norm(heads, (64,), None, 1e-6))
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.rms_norm_bf16(heads, _bf16(4, 64), 1e-6)


def test_rms_norm_interface_declines_what_it_does_not_serve(kernels) -> None:
    from afd.kernels import rms_norm

    x = _bf16(2, 16)
    assert rms_norm(x.float(), _bf16(16).float(), 1e-6) is None  # fp32: torch's path
    assert rms_norm(x.T, _bf16(2), 1e-6) is None  # last dim not contiguous
    assert torch.equal(rms_norm(x, _bf16(16), 1e-6), _bf16(16) * F.rms_norm(x, (16,), None, 1e-6))


@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(1, 20, 64), (9, 3, 128), (40, 4, 16)])
def test_rope_is_bit_identical_to_the_torch_path(kernels, tokens: int, heads: int, head_dim: int) -> None:
    """On a strided view (q and k heads inside the fused qkv output) and on whole tensors, as the model calls it."""
    from afd.kernels import rope
    from afd.model_spec import RopeSpec
    from attn_nodes.rope import RotaryEmbedding

    embedding = RotaryEmbedding(RopeSpec(rotary_dim=head_dim, theta=10000.0), 512, torch.bfloat16)
    positions = torch.randint(0, 512, (tokens,), generator=torch.Generator().manual_seed(tokens))
    cos, sin = embedding.tables(positions)
    x = _bf16(tokens, heads + 5, head_dim, seed=13)[:, 2 : 2 + heads]
    half = head_dim // 2
    expected = x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin  # the torch path of apply()
    assert torch.equal(rope(x, cos, sin), expected)
    assert torch.equal(embedding.apply(x.contiguous(), cos, sin), expected)
    assert rope(x.float(), cos, sin) is None  # fp32: torch's path
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        kernels.rope_bf16(x, cos[:, :, :half], sin)


@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_add_partials_is_bit_identical_to_the_fp32_sum_of_the_torch_path(kernels, tokens: int) -> None:
    """Two or three FFN nodes' partials, some covering every row, some only their own rows (the dispatcher's two
    layouts), against the dispatcher's torch path: fp32 sum in node order, one rounding, one add."""
    from afd.kernels import add_partials

    hidden = 100  # six 16-wide vectors and a tail of four
    g = torch.Generator().manual_seed(tokens)
    some = torch.randperm(tokens, generator=g)[: max(1, tokens // 2)].sort().values
    parts = [(_bf16(tokens, hidden, seed=1), None), (_bf16(some.numel(), hidden, seed=2), some)]
    if tokens > 1:
        parts.append((_bf16(tokens, hidden, scale=1e-3, seed=3), None))
    residual = _bf16(tokens, hidden, scale=4.0, seed=4)
    total = torch.zeros(tokens, hidden)
    for part, rows in parts:
        if rows is None:
            total += part.float()
        else:
            total.index_add_(0, rows, part.float())
    expected = residual + total.to(torch.bfloat16)
    assert add_partials(residual, parts) and torch.equal(residual, expected)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.add_partials_bf16(residual, [parts[1][0]], [some + tokens])
    assert not add_partials(residual.float(), [(p.float(), r) for p, r in parts])  # fp32: the torch path's


@pytest.mark.parametrize(("rows", "vocab"), [(1, 32000), (5, 1000), (33, 37), (2, 15)])
def test_greedy_tokens_equal_torch_max_with_ties_nan_and_inf(kernels, rows: int, vocab: int) -> None:
    from afd.kernels import greedy_tokens

    if kernels.available_isa() != "avx512_bf16":
        pytest.skip("the native argmax needs AVX512; torch's max serves elsewhere")
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g)
    logits[0, vocab // 3] = logits[0, vocab - 1] = 50.0  # a tie: the first index wins
    if rows > 2:
        logits[1, 7] = float("nan")  # NaN counts as the largest, as in torch.max
        logits[1, 3] = float("nan")
        logits[2] = float("-inf")  # an all -inf row answers 0
    padded = torch.randn(rows, vocab + 5, generator=g)[:, :vocab]  # rows strided, columns contiguous
    for case in (logits, padded):
        assert torch.equal(kernels.argmax_rows_f32(case), case.max(dim=-1).indices)
        assert torch.equal(greedy_tokens(case), case.max(dim=-1).indices)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.argmax_rows_f32(logits.bfloat16())


def test_amx_tiles_match_the_vector_path(kernels, tmp_path: Path) -> None:
    """Where the CPU has AMX, linears of 4 or more rows run on the tiles: every output within one rounding of the
    exact product and nearly all equal to the AVX512 path's (AFD_NATIVE_ISA=avx512_bf16 in another process);
    tails of every kind: rows past a 16-row tile and odd tile counts, outputs past a 16-row weight tile."""
    if kernels.matrix_isa() != "amx_bf16":
        pytest.skip(f"no AMX tiles here (instruction set {kernels.available_isa()})")
    cases = [(4, 64, 16), (16, 1024, 1536), (17, 512, 1043), (33, 96, 2000), (64, 256, 37)]
    inputs = {f"{r}x{k}x{n}": (_bf16(r, k, seed=r), _bf16(n, k, scale=0.05, seed=n)) for r, k, n in cases}
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import torch; from afd.kernels import native; m = native.load(); "
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r}); "
        f"torch.save({{k: m.linear_bf16(x, w) for k, (x, w) in d.items()}}, {str(tmp_path / 'out.pt')!r}); "
        "print(repr(m.matrix_isa()), m.matrix_min_rows())"
    )
    assert _run(code, AFD_NATIVE_ISA="avx512_bf16") == "'' 4"
    vector = torch.load(tmp_path / "out.pt")
    for key, (x, w) in inputs.items():
        tiles = kernels.linear_bf16(x, w)
        exact = x.double() @ w.double().T
        step = exact.abs().clamp_min(1e-3) * 2**-7
        assert ((tiles.double() - exact).abs() <= step).all(), key
        assert (tiles == vector[key]).float().mean() > 0.99, key
    assert (
        _run(
            "from afd.kernels import native; m = native.load(); print(m.matrix_isa(), m.matrix_min_rows())",
            AFD_NATIVE_AMX_MIN_ROWS="9",
        )
        == "amx_bf16 9"
    )


def test_a_prebuilt_library_loads_without_a_compiler_or_ninja(kernels, tmp_path):
    """What the CPU image does: the library built at image build time (AFD_NATIVE_KERNELS_DIR) is imported by a
    runtime with no compiler and no ninja on PATH. Only the .so is copied, so a build could not even start."""
    import shutil

    built = native._build_dir() / f"{native.MODULE_NAME}.so"
    assert built.is_file(), f"the session's build is not at {built}"
    target = tmp_path / native._build_dir().name
    target.mkdir()
    shutil.copy2(built, target / built.name)
    code = (
        "import shutil, sys\n"
        "assert shutil.which('g++') is None and shutil.which('c++') is None\n"
        "from afd.kernels import native\n"
        "module = native.load()\n"
        "print(native.failure() if module is None else module.available_isa())\n"
        "print(module.__file__ if module is not None else '')\n"
    )
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), native.DIR_ENV: str(tmp_path), "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    isa, path = result.stdout.split("\n")[:2]
    assert isa == kernels.available_isa()
    assert path == str(target / built.name)
