"""The vLLM side of `afd bench engine --peer vllm` (benchmarks.vllm_peer starts it), run by a vLLM venv.

It imports nothing from this project (that venv has vLLM and its own torch, not AFD), loads the model once
with `LLM(...)`, then answers one JSON request per stdin line: `{"prompts": [[ids...], ...], "new_tokens": N}`
-> `{"seconds": s, "tokens": t}` on the protocol stream, greedy, `ignore_eos`, token-id prompts and
`skip_tokenizer_init=True` as the benchmark checkpoints have no tokenizer. vLLM logs to stdout, so the
protocol uses a copy of the original stdout taken before vLLM is imported and stdout itself goes to stderr.
Arguments: MODEL_DIR DTYPE MAX_NUM_SEQS MAX_MODEL_LEN.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    # This script's folder is first on sys.path, and it holds modules named like packages vLLM's imports
    # probe for (benchmarks/kernels.py shadows the `kernels` package transformers looks up): drop it.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    model_dir, dtype, max_num_seqs, max_model_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype=dtype,
        skip_tokenizer_init=True,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        seed=0,
    )
    protocol.write(json.dumps({"ready": True, "version": vllm.__version__}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
        prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        first = list(outputs[0].outputs[0].token_ids) if outputs else []
        protocol.write(json.dumps({"seconds": seconds, "tokens": tokens, "first_output": first}) + "\n")


if __name__ == "__main__":
    main()
