"""plan.json: what `afd plan -o` writes and `afd up --plan` / `afd k8s render --plan` read.

A versioned JSON document, validated on read (unknown fields, a missing field, a count below one or a future
version are errors naming the field). `deployment` is the chosen candidate, the only part the launchers
use; `candidates` and `rules` are there for people and tools reading the plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from afd.errors import ConfigError

PLAN_VERSION = 1
"""Format version written by this release (PlanFile.version); a reader refuses any other."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Pool(_Model):
    """One role's hardware in the chosen deployment."""

    kind: str = Field(min_length=1)
    """Catalog kind (h20, l40s, cpu, ...)."""
    count: int = Field(ge=1)
    """Nodes of the role (one device each)."""
    k8s_resource: str | None = None
    """Extended resource a pod of this kind requests (None: CPU)."""
    k8s_product: str | None = None
    """GPU-product node label value that pins the pool to the kind."""


class Deployment(_Model):
    """The chosen deployment: what `afd up --plan` and `afd k8s render --plan` bring up."""

    attention: Pool
    """The attention pool."""
    ffn: Pool
    """The FFN pool."""
    microbatches: int = Field(ge=1)
    """Ping-pong microbatches per decode step (`--microbatches`)."""
    batch_per_attention_node: int = Field(ge=1)
    """Requests per attention node the prediction assumes (the nodes' max_num_seqs should allow it)."""


class PlanFile(_Model):
    """The whole plan.json."""

    version: Literal[1] = 1
    """Plan format version."""
    model: str
    """The --model the plan was made for."""
    architecture: str
    """The model's architecture (config.json architectures[0])."""
    request: dict[str, Any]
    """What was asked: inventory, SLO, context, link, prices, objective."""
    deployment: Deployment
    """The chosen deployment."""
    prediction: dict[str, Any]
    """The cost model's figures for the chosen deployment."""
    rules: dict[str, Any]
    """Which microbatch rule the choice follows and why."""
    candidates: list[dict[str, Any]]
    """The top candidates with their predictions, best first."""

    def up_arguments(self) -> list[str]:
        """The `afd up` flags this plan stands for (node counts and microbatches)."""
        d = self.deployment
        return ["--attn", str(d.attention.count), "--ffn", str(d.ffn.count), "--microbatches", str(d.microbatches)]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


def read_plan(path: Path) -> PlanFile:
    """Read and validate plan.json; ConfigError lists every problem with its field."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read plan {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"plan {path} is not valid JSON: {error}") from None
    if isinstance(data, dict) and data.get("version") not in (None, PLAN_VERSION):
        raise ConfigError(
            f"plan {path} has version {data.get('version')!r}; this release reads version {PLAN_VERSION} "
            "(make it again with `afd plan -o`)"
        )
    try:
        return PlanFile.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"  - {'.'.join(str(p) for p in item['loc']) or '(top level)'}: {message}")
        raise ConfigError(f"invalid plan {path}:\n" + "\n".join(problems)) from None
