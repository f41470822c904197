"""Reading quantised checkpoint tensors into the compute dtype.

One format is understood: the **fp8 block-scaled e4m3** layout that DeepSeek-V3 / R1, Kimi K2 and the Qwen3
`-FP8` releases publish (and transformers' `FineGrainedFP8Config` reads). config.json carries

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

and each quantised Linear weight `<name>.weight` `[out, in] float8_e4m3fn` has a sibling
`<name>.weight_scale_inv` `[ceil(out / bm), ceil(in / bn)] float32`: block (i, j) of the weight, rows
`i*bm:(i+1)*bm` and columns `j*bn:(j+1)*bn` (the last blocks cropped to the true shape), is
`weight.float() * scale_inv[i, j]`. Tensors left in full precision (norms, embeddings, the LM head, the MoE
gate, whatever `modules_to_not_convert` names) are stored in bf16/fp32 and have no scale; the tensor's own
dtype says which is which.

Every weight is **dequantised on the CPU as it is read** and handed to the role in its compute dtype, on
every device: this release has no fp8 GEMM. Keeping the weights in fp8 with a block-scaled GEMM on the
accelerators that have one belongs to the accelerator kernels, not here. Dequantisation works one row
block at a time straight into the output tensor, so the fp32 intermediate is one `bm x in` strip and the
model is never materialised in fp32; together with the reader holding one shard open at a time, the
peak memory of a load stays near one shard plus the node's own weights (`afd bench load-memory` measures it).

Any other quantisation (GPTQ, AWQ, MXFP4 of gpt-oss, bitsandbytes, compressed-tensors, ...) is refused by
name when the checkpoint is opened rather than read as if its packed integers were weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from afd.dtypes import COMPUTE_DTYPES
from afd.errors import CheckpointError, MissingTensorError, ShapeMismatchError

SUPPORTED_QUANTIZATION = "fp8 block-scaled e4m3 (quant_method 'fp8' with weight_block_size and weight_scale_inv)"

SCALE_SUFFIX = "weight_scale_inv"

# safetensors' names of the float8 storage types; only e4m3 is a published block format.
_FP8_STORAGE = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# Scales are float32 as published; bf16/fp16 and e8m0 (DeepSeek-V3.1's `scale_fmt: ue8m0`) convert exactly.
_SCALE_STORAGE = {"F32", "BF16", "F16", "F8_E8M0"}


class UnsupportedQuantizationError(CheckpointError):
    """config.json declares a quantisation format AFD cannot read."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}; supported quantisation: {SUPPORTED_QUANTIZATION}, or none")


def is_quantized_storage(part: Any) -> bool:
    """Whether a safetensors slice handle holds float8 data (which is meaningless without its scales)."""
    return str(part.get_dtype()) in _FP8_STORAGE


def scale_name(weight_name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `model.layers.0.mlp.down_proj.weight_scale_inv`."""
    return weight_name.removesuffix("weight") + SCALE_SUFFIX if weight_name.endswith(".weight") else ""


@dataclass(frozen=True, slots=True)
class Fp8BlockScheme:
    """fp8 e4m3 weights with one float scale per `block` of rows x columns, as config.json declares it."""

    block: tuple[int, int]
    """Rows x columns of weight sharing one scale (`weight_block_size`, [128, 128] in every release)."""
    config_dtype: torch.dtype = torch.bfloat16
    """Dtype to dequantise to when the reader was given none (config.json's `torch_dtype`)."""

    @classmethod
    def from_config(cls, config: dict[str, Any], config_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockScheme | None:
        """The scheme of a parsed config.json, None for an unquantised checkpoint; any other format raises."""
        if "compression_config" in config:  # the older spelling of compressed-tensors
            raise UnsupportedQuantizationError("config.json declares compressed-tensors quantisation")
        q = config.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict) or not isinstance(q.get("quant_method"), str):
            raise UnsupportedQuantizationError(f"config.json quantization_config has no quant_method: {q!r}")
        method = q["quant_method"].lower()
        if method != "fp8":
            raise UnsupportedQuantizationError(f"config.json declares quant_method {method!r}, which AFD cannot read")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UnsupportedQuantizationError(f"config.json declares fp8 fmt {fmt!r}")
        if q.get("expert_dtype", "fp8") != "fp8":
            raise UnsupportedQuantizationError(f"config.json declares fp8 experts stored as {q['expert_dtype']!r}")
        if q.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
            raise UnsupportedQuantizationError(f"config.json declares activation_scheme {q['activation_scheme']!r}")
        block = q.get("weight_block_size")
        if block is None:
            raise UnsupportedQuantizationError("config.json declares fp8 without weight_block_size (per-tensor scales)")
        if (
            not isinstance(block, list | tuple)
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise CheckpointError(f"config.json quantization_config.weight_block_size {block!r} is not [rows, cols]")
        # activation_scheme "static" ships activation scales as well; dequantised compute has no use for them.
        return cls((block[0], block[1]), config_dtype)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the scale grid of a `shape` weight: one entry per block, the last blocks partial."""
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def dequantize(
        self,
        name: str,
        weight: Any,
        scale: Any,
        dtype: torch.dtype | None,
        dim: int | None = None,
        start: int = 0,
        end: int = 0,
    ) -> torch.Tensor:
        """Weight `name` (or rows / columns [start, end) of it along `dim`) in `dtype`.

        `weight` and `scale` are safetensors slice handles (`safe_open(...).get_slice`) of `name` and of its
        `weight_scale_inv`; only the part asked for, and the scale blocks covering it, are read.
        Returns `[rows, cols] dtype`.
        """
        dtype = dtype or self.config_dtype
        storage = str(weight.get_dtype())
        if _FP8_STORAGE.get(storage) is not torch.float8_e4m3fn:
            raise CheckpointError(f"tensor {name!r} is stored as {storage}; the fp8 block format stores F8_E4M3")
        shape = tuple(weight.get_shape())
        if len(shape) != 2:
            raise ShapeMismatchError(f"quantised tensor {name!r} has shape {shape}; block scales need a 2-D weight")
        rows, cols = shape
        expected = self.scale_shape((rows, cols))
        sname = scale_name(name)
        found = tuple(scale.get_shape())
        if found != expected:
            raise ShapeMismatchError(
                f"scale tensor {sname!r} has shape {found}, but weight {name!r} {shape} with weight_block_size "
                f"{list(self.block)} from config.json needs {expected}: the block size does not match the checkpoint"
            )
        if str(scale.get_dtype()) not in _SCALE_STORAGE:
            raise CheckpointError(f"scale tensor {sname!r} is stored as {scale.get_dtype()}, not a float type")
        r0, r1, c0, c1 = 0, rows, 0, cols
        if dim == 0:
            r0, r1 = start, end
        elif dim == 1:
            c0, c1 = start, end
        bm, bn = self.block
        b0, b1 = r0 // bm, math.ceil(r1 / bm)  # scale rows covering [r0, r1)
        k0, k1 = c0 // bn, math.ceil(c1 / bn)  # scale columns covering [c0, c1)
        scales = scale[b0:b1, k0:k1].to(torch.float32)
        if not bool(torch.isfinite(scales).all()):
            raise CheckpointError(f"scale tensor {sname!r} holds a non-finite value")
        # Column j of the output takes the scale of block (j + c0) // bn.
        column_block = torch.arange(c0, c1) // bn - k0
        out = torch.empty(r1 - r0, c1 - c0, dtype=dtype)
        for b in range(b0, b1):
            lo, hi = max(r0, b * bm), min(r1, (b + 1) * bm)
            if lo >= hi:
                continue
            strip = weight[lo:hi, c0:c1].to(torch.float32)  # one bm-row strip in fp32, never the whole matrix
            out[lo - r0 : hi - r0] = (strip * scales[b - b0][column_block]).to(dtype)
        return out


def read_tensor(
    scheme: Fp8BlockScheme | None,
    name: str,
    part: Any,
    scale_of: Callable[[str], Any | None],
    dtype: torch.dtype | None,
    dim: int | None = None,
    start: int = 0,
    end: int = 0,
) -> tuple[torch.Tensor, str] | None:
    """Tensor `name` dequantised (whole, or [start, end) along `dim`) and its scale's name; None if `name`
    is stored in full precision, which the caller then reads as it is.

    `part` is the safetensors slice handle of `name`; `scale_of(n)` the handle of tensor `n`, None when the
    checkpoint has none. Refuses an fp8 tensor without a scheme or a scale, and a full-precision weight that
    has a scale (a checkpoint that says two things about one tensor).
    """
    sname = scale_name(name)
    scale = scale_of(sname) if sname else None
    if not is_quantized_storage(part):
        if scale is not None:
            raise CheckpointError(
                f"tensor {name!r} is stored as {part.get_dtype()} but the checkpoint also has its scale {sname!r}"
            )
        return None
    if scheme is None:
        raise UnsupportedQuantizationError(
            f"tensor {name!r} is stored as {part.get_dtype()} but config.json declares no quantization_config"
        )
    if scale is None:
        raise MissingTensorError(
            f"quantised tensor {name!r} ({part.get_dtype()}) has no scale tensor {sname or name + '_scale_inv'!r} "
            "in the checkpoint; fp8 block-scaled weights cannot be read without it"
        )
    return scheme.dequantize(name, part, scale, dtype, dim, start, end), sname


def checkpoint_scheme(model_dir: Path) -> Fp8BlockScheme | None:
    """The quantisation of the checkpoint in `model_dir` from its config.json (None without one, or unquantised)."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not JSON: {exc}") from exc
    named = config.get("torch_dtype", config.get("dtype"))
    return Fp8BlockScheme.from_config(config, COMPUTE_DTYPES.get(str(named), torch.bfloat16))
