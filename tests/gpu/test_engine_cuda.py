"""The engine on CUDA against transformers on CUDA, every supported architecture (tests/checkpoints.py).

fp32: identical greedy tokens (torch leaves TF32 off for matmuls by default, and the test makes sure).
bf16: identical greedy tokens, except that where transformers' own top two logits are closer than BF16_TIE at
some step, the two may part there (a bf16 rounding decides a near tie either way); nothing after that step is
compared. BF16_TIE is the stated tolerance: 1/16 of a logit, about the bf16 rounding error of logits of this
size summed over a few layers.
"""

from __future__ import annotations

import pytest
import torch

from afd.sampling_params import SamplingParams
from tests.checkpoints import ARCHITECTURES
from tests.gpu.gpu_helpers import NEW_TOKENS, PROMPTS, engine_on, reference_greedy, reference_on, requires_cuda

pytestmark = requires_cuda

GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
BF16_TIE = 1 / 16


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp32_greedy_tokens_equal_transformers_on_cuda(arch, tiny_checkpoint):
    directory = tiny_checkpoint(arch)
    reference = reference_on(directory, "cuda", torch.float32)
    expected = [reference_greedy(reference, prompt, NEW_TOKENS, "cuda")[0] for prompt in PROMPTS]
    engine = engine_on(directory, "cuda", "cuda", "float32")
    assert engine.generate(PROMPTS, GREEDY) == expected
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "every block returns to the pool"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_greedy_tokens_equal_transformers_on_cuda_up_to_a_near_tie(arch, tiny_checkpoint):
    directory = tiny_checkpoint(arch)
    reference = reference_on(directory, "cuda", torch.bfloat16)
    engine = engine_on(directory, "cuda", "cuda", "bfloat16")
    outputs = engine.generate(PROMPTS, GREEDY)
    for prompt, got in zip(PROMPTS, outputs, strict=True):
        expected, margins = reference_greedy(reference, prompt, NEW_TOKENS, "cuda")
        parted = next((step for step, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
        if parted is not None:
            assert margins[parted] < BF16_TIE, (
                f"{arch} prompt {prompt}: step {parted} chose {got[parted]}, transformers {expected[parted]} by a "
                f"margin of {margins[parted]:.4f} logits (>= {BF16_TIE}); tokens {got} vs {expected}"
            )
