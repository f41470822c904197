"""Role-pruned safetensors reading: each role opens the checkpoint and reads only the tensors it owns.

Reads go through `safe_open`, which memory-maps the files, so a tensor that is never asked for is never
paged in. Every read is recorded in `tensors_read`, which is how tests prove the pruning. One shard is held
open at a time: the pages a read touched stay resident while their file is mapped, so closing the previous
shard keeps a load's peak memory near one shard plus the weights kept. Quantised tensors (fp8 block-scaled, as
DeepSeek-V3 and the Qwen3 -FP8 releases publish them) are dequantised to the reader's dtype as they are read,
by `afd.quantized_weights`, which also refuses every other quantisation format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from afd.errors import CheckpointError, MissingTensorError, ShapeMismatchError
from afd.quantized_weights import checkpoint_scheme, is_quantized_storage, read_tensor

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Reads named tensors (whole, or a row/column slice) from a single or sharded safetensors checkpoint."""

    def __init__(
        self, model_dir: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """`device`: where every tensor read is placed (None: the CPU). Each tensor moves from the memory map
        straight to it, one at a time, so a shard is never copied whole into host memory first."""
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.tensors_read: set[str] = set()
        self.rows_read: dict[str, set[int]] = {}
        """Stacked tensors read in part (get_rows): name -> the dim-0 rows read."""
        self._handles: dict[Path, Any] = {}
        self._quant = checkpoint_scheme(self.model_dir)
        self._file_of = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
            return {name: self.model_dir / file for name, file in weight_map.items()}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.model_dir}")
        file_of: dict[str, Path] = {}
        for file in files:
            for name in self._open(file).keys():  # noqa: SIM118 - safe_open has no __iter__
                file_of[name] = file
        return file_of

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"checkpoint shard {file} is missing")
            # Tensors already read do not need their handle (slices are copies, whole tensors hold their own
            # mapping), so dropping it unmaps whatever this reader alone still kept resident of that shard.
            self._handles.clear()
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _locate(self, name: str) -> Any:
        if name not in self._file_of:
            raise MissingTensorError(f"tensor {name!r} is missing from checkpoint {self.model_dir}")
        return self._open(self._file_of[name])

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor, cast to the reader's dtype; `shape` is checked when given."""
        handle = self._locate(name)
        quantized = read_tensor(self._quant, name, handle.get_slice(name), self._scale, self.dtype)
        tensor = handle.get_tensor(name) if quantized is None else self._note_scale(quantized)
        return self._finish(name, tensor, shape)

    def get_slice(
        self, name: str, dim: int, start: int, end: int, full_shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, end) of a 2-D tensor, reading only that part.

        `full_shape`, when given, is checked against the whole tensor before slicing.
        """
        handle = self._locate(name)
        part = handle.get_slice(name)
        full = tuple(part.get_shape())
        if full_shape is not None and full != tuple(full_shape):
            raise ShapeMismatchError(f"tensor {name!r} has shape {full}, config implies {tuple(full_shape)}")
        if len(full) != 2 or not 0 <= start <= end <= full[dim]:
            raise ShapeMismatchError(f"cannot slice {name!r} {full} along dim {dim} at [{start}, {end})")
        quantized = read_tensor(self._quant, name, part, self._scale, self.dtype, dim, start, end)
        if quantized is not None:
            return self._finish(name, self._note_scale(quantized), None)
        tensor = part[start:end] if dim == 0 else part[:, start:end]
        return self._finish(name, tensor, None)

    def _scale(self, name: str) -> Any | None:
        return self._locate(name).get_slice(name) if name in self._file_of else None

    def _note_scale(self, quantized: tuple[torch.Tensor, str]) -> torch.Tensor:
        self.tensors_read.add(quantized[1])
        return quantized[0]

    def get_rows(self, name: str, rows: Sequence[int], full_shape: tuple[int, ...]) -> torch.Tensor:
        """Rows `rows` (dim 0, in that order) of a stacked tensor such as gpt-oss's fused experts, reading
        only those rows; `full_shape` is checked against the whole tensor. Recorded in `rows_read`."""
        part = self._locate(name).get_slice(name)
        full = tuple(part.get_shape())
        if full != tuple(full_shape):
            raise ShapeMismatchError(f"tensor {name!r} has shape {full}, config implies {tuple(full_shape)}")
        if not rows or any(not 0 <= row < full[0] for row in rows):
            raise ShapeMismatchError(f"cannot read rows {list(rows)} of {name!r} {full}")
        if is_quantized_storage(part):  # block scales of fused 3-D expert stacks: no published layout yet
            raise CheckpointError(f"tensor {name!r} is a quantised stack ({part.get_dtype()}); fp8 is read in 2-D")
        tensor = torch.cat([part[row : row + 1] for row in rows])
        self.rows_read.setdefault(name, set()).update(rows)
        return self._finish(name, tensor, None)

    def _finish(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(tensor.shape)}, config implies {tuple(shape)}")
        self.tensors_read.add(name)
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        if self.device is not None and self.device.type != "cpu":
            # Cast after the copy: the host side then never holds more than the mapped pages.
            return tensor.contiguous().to(self.device, non_blocking=False).to(dtype)
        return tensor.to(dtype).contiguous()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
