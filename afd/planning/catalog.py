"""The hardware catalog: datasheet figures of each kind of accelerator and of each A↔F link, with sources.

`afd plan` reads `hardware.yaml` next to this module (or a file the user names). Every figure carries the
document it comes from, so a reader can check it and a user can replace it; an entry without a source, with a
negative figure or a misspelt field is refused with the field named (`CatalogError`). Units are in the field
names (`_tflops`, `_gb`, `_gb_per_s`, `_us`, `_usd_per_hour`).

The cost model (cost_model.py) uses these figures only to scale what nodes measured on one kind to another
kind: the memory-bandwidth ratio for the memory-bound parts of decode, the FLOP ratio for the compute-bound
parts. A kind nobody measured is predicted from its datasheet roofline, and the plan says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from afd.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("hardware.yaml")
"""The catalog shipped with AFD."""

DeviceClass = Literal["gpu", "npu", "cpu"]


class CatalogError(ConfigError):
    """The catalog (or an entry of it) is invalid; the message names the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Figure(_Model):
    """One number and where it comes from."""

    value: float = Field(gt=0)
    """The figure, in the unit its field name says."""
    source: str = Field(min_length=1)
    """The document (datasheet, white paper) it comes from, or a plain statement that it is a third-party
    report, an estimate or a placeholder to be measured."""

    @field_validator("source")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a figure needs a source (datasheet name or 'estimate: ...')")
        return value


class Interconnect(_Model):
    """The kind's scale-up link between devices of one host (informational: A↔F links are in `links`)."""

    name: str
    """NVLink 4, Infinity Fabric, PCIe Gen4 x16, ..."""
    bandwidth_gb_per_s: float = Field(gt=0)
    """Per device, as the datasheet prints it (usually bidirectional), 1e9 bytes/s."""
    source: str = Field(min_length=1)
    """Where the figure comes from."""


class HardwareKind(_Model):
    """One kind of accelerator (or a CPU host): what one AFD node of that kind computes and holds."""

    name: str
    """Product name."""
    device_class: DeviceClass
    """gpu, npu or cpu: a measured kind's efficiency is only carried over to unmeasured kinds of its class."""
    device_names: list[str] = Field(default_factory=list)
    """Substrings of the device kind a node reports ("NVIDIA H200", "cpu (8 threads)") that mean this kind;
    used to read a router's cluster view as calibration."""
    k8s_resource: str | None = None
    """Extended resource a pod of this kind requests (nvidia.com/gpu, amd.com/gpu); None: a CPU pod."""
    k8s_product: str | None = None
    """Value of the GPU-product node label that pins a pool to this kind (nvidia.com/gpu.product)."""
    bf16_dense_tflops: Figure
    """Peak dense BF16 tensor throughput, 1e12 FLOP/s (no structured sparsity)."""
    fp8_dense_tflops: Figure | None = None
    """Peak dense FP8 tensor throughput, 1e12 FLOP/s; None where the kind has no FP8 units."""
    memory_gb: Figure
    """Device memory, 1e9 bytes (host memory for a CPU entry)."""
    memory_bandwidth_gb_per_s: Figure
    """Peak memory bandwidth, 1e9 bytes/s."""
    interconnect: Interconnect | None = None
    """Scale-up link of the device."""
    price_usd_per_hour: Figure
    """Default price of one device for one hour, US dollars; `afd plan --price kind=X` overrides it."""

    def flops_per_s(self, dtype: Literal["bf16", "fp8"]) -> float:
        """Peak dense FLOP/s for weights and activations of `dtype` (fp8 falls back to bf16 where absent)."""
        if dtype == "fp8" and self.fp8_dense_tflops is not None:
            return self.fp8_dense_tflops.value * 1e12
        return self.bf16_dense_tflops.value * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb.value * 1e9

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gb_per_s.value * 1e9


class LinkKind(_Model):
    """An attention↔FFN link: what one node's network (or bus) moves and how long one exchange takes."""

    bandwidth_gb_per_s: Figure
    """Per direction, per node, 1e9 bytes/s."""
    latency_us: Figure
    """One-way latency of one exchange (a frame there), microseconds: `afd bench transport`'s p50 one-way."""


class Catalog(_Model):
    """The whole catalog file."""

    version: Literal[1] = 1
    """Catalog format version."""
    kinds: dict[str, HardwareKind]
    """Kind name (what `--hardware h20:16` says) -> its figures."""
    links: dict[str, LinkKind]
    """Link name (what `--link 400gbe` says) -> its figures."""

    @field_validator("kinds", "links")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or name != name.lower() or any(c in name for c in " :,="):
                raise ValueError(f"name {name!r} must be lowercase without spaces, ':', ',' or '='")
        return value

    def kind(self, name: str) -> HardwareKind:
        try:
            return self.kinds[name.lower()]
        except KeyError:
            raise CatalogError(
                f"unknown hardware kind {name!r}; the catalog has: {', '.join(sorted(self.kinds))} "
                "(add an entry to the catalog for another kind)"
            ) from None

    def link(self, name: str) -> LinkKind:
        try:
            return self.links[name.lower()]
        except KeyError:
            raise CatalogError(f"unknown link {name!r}; the catalog has: {', '.join(sorted(self.links))}") from None

    def kind_of_device(self, device_kind: str) -> str | None:
        """The catalog kind whose device_names match a node's reported device kind (longest match), or None."""
        text = device_kind.lower()
        best: tuple[int, str] | None = None
        for name, kind in self.kinds.items():
            for pattern in kind.device_names:
                if pattern.lower() in text and (best is None or len(pattern) > best[0]):
                    best = (len(pattern), name)
        return None if best is None else best[1]


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def parse_catalog(data: Any, source: str = "hardware catalog") -> Catalog:
    """Validate a parsed catalog; CatalogError lists every problem with its field (kinds.h100.memory_gb.source)."""
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: expected a mapping with 'kinds' and 'links', got {type(data).__name__}")
    try:
        return Catalog.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            message = str(item["msg"]).removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"  - {_location(tuple(item['loc']))}: {message}")
        raise CatalogError(f"invalid {source}:\n" + "\n".join(problems)) from None


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate a catalog file (the shipped hardware.yaml when `path` is None)."""
    path = CATALOG_PATH if path is None else path
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise CatalogError(f"cannot read hardware catalog {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise CatalogError(f"{path} is not valid YAML: {error}") from None
    return parse_catalog(data, str(path))
