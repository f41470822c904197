"""What nodes measured, in the form the cost model fits: per-kind attention and FFN timings, measured links.

The sources are the ones the cluster already produces:
- a node's CapacityProfile (attention: µs per token per layer at a batch and context, attn_nodes/calibration.py;
  FFN: µs per (token, expert) pair per layer, ffn_nodes/node.py), read from a router's cluster view
  (`afd status --json`, or GET /afd/v1/cluster), each node's device kind mapped to a catalog kind;
- `afd bench transport --json` (one JSON object per line): the streaming bandwidth of its largest frame and
  the p50 one-way latency, as a link named `measured` (or `measured-<transport>`);
- a calibration file written by hand or by a benchmark (`version: 1`, `kinds: {cpu: {attention: [...],
  ffn: [...]}}`, `links: {name: {bandwidth_gb_per_s, latency_us}}`).
`load_calibration` tells them apart by their shape; several files merge (`merge`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from afd.errors import ConfigError

ATTENTION_CALIBRATION_BATCH = 8
"""Decode batch at which attention nodes time themselves (attn_nodes/calibration.py CALIBRATION_BATCH)."""
ATTENTION_CALIBRATION_CONTEXT = 128
"""Context at which attention nodes time themselves (attn_nodes/calibration.py CALIBRATION_CONTEXT)."""
FFN_CALIBRATION_TOKENS = 16
"""Tokens FFN nodes push through one expert to time themselves (ffn_nodes/node.py ffn_us_per_token_expert)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class AttentionMeasurement(_Model):
    """One timing of an attention node's attention half (what CapacityProfile.attention_us_per_token says)."""

    us_per_token: float = Field(gt=0)
    """Microseconds per token per layer of a decode batch (mean over the layers)."""
    batch: int = Field(default=ATTENTION_CALIBRATION_BATCH, ge=1)
    """Decode batch (tokens) of the timing."""
    context_len: int = Field(default=ATTENTION_CALIBRATION_CONTEXT, ge=0)
    """Context length of every sequence of the batch, tokens."""


class FfnMeasurement(_Model):
    """One timing of an FFN node (what CapacityProfile.ffn_us_per_token_expert says)."""

    us_per_token_expert: float = Field(gt=0)
    """Microseconds per (token, expert) pair per layer."""
    tokens: int = Field(default=FFN_CALIBRATION_TOKENS, ge=1)
    """Tokens pushed through one expert (or the dense MLP) in the timing."""


class KindCalibration(_Model):
    """Measurements of one hardware kind."""

    attention: tuple[AttentionMeasurement, ...] = ()
    """Attention-node timings; two or more at different batches fit both terms of T_a = k1*b + k2."""
    ffn: tuple[FfnMeasurement, ...] = ()
    """FFN-node timings."""


class MeasuredLink(_Model):
    """A link as measured (`afd bench transport`)."""

    bandwidth_gb_per_s: float = Field(gt=0)
    """Per direction, 1e9 bytes/s."""
    latency_us: float = Field(ge=0)
    """One-way latency of one exchange, microseconds."""
    source: str = "measured"
    """Where the figures come from."""


class Calibration(_Model):
    """Everything measured that a plan is fitted to."""

    version: Literal[1] = 1
    """Calibration file format version."""
    kinds: dict[str, KindCalibration] = Field(default_factory=dict)
    """Catalog kind -> its measurements."""
    links: dict[str, MeasuredLink] = Field(default_factory=dict)
    """Link name -> measured figures (usable as `--link NAME`)."""

    def merge(self, other: Calibration) -> Calibration:
        """Both calibrations' measurements; links of `other` replace same-named ones."""
        kinds = dict(self.kinds)
        for name, kind in other.kinds.items():
            mine = kinds.get(name, KindCalibration())
            kinds[name] = KindCalibration(attention=mine.attention + kind.attention, ffn=mine.ffn + kind.ffn)
        return Calibration(kinds=kinds, links={**self.links, **other.links})


def from_cluster_view(view: dict[str, Any], kind_of_device: Any) -> Calibration:
    """The measured costs of a router's cluster view; `kind_of_device(str) -> kind | None` maps device kinds.

    Nodes whose device matches no catalog kind are skipped (their kind is unknown to the planner).
    """
    kinds: dict[str, KindCalibration] = {}
    for node in view.get("nodes", []):
        kind = kind_of_device(str(node.get("device_kind", "")))
        measured = node.get("measured_us") or {}
        if kind is None or node.get("state") not in (None, "ready", "joining", "draining"):
            continue
        current = kinds.get(kind, KindCalibration())
        if node.get("role") == "attention" and measured.get("per_token", 0) > 0:
            point = AttentionMeasurement(
                us_per_token=measured["per_token"],
                context_len=int(measured.get("at_context_len") or ATTENTION_CALIBRATION_CONTEXT),
            )
            current = KindCalibration(attention=(*current.attention, point), ffn=current.ffn)
        elif node.get("role") == "ffn" and measured.get("per_token_expert", 0) > 0:
            ffn = FfnMeasurement(us_per_token_expert=measured["per_token_expert"])
            current = KindCalibration(attention=current.attention, ffn=(*current.ffn, ffn))
        kinds[kind] = current
    return Calibration(kinds=kinds)


def from_transport_rows(rows: list[dict[str, Any]], source: str) -> Calibration:
    """A link from `afd bench transport --json` rows: the largest frame's algbw and the p50 one-way latency."""
    bandwidth = [r for r in rows if r.get("kind") == "bandwidth"]
    latency = [r for r in rows if r.get("kind") == "latency"]
    if not bandwidth:
        raise ConfigError(f"{source}: no bandwidth rows (is this `afd bench transport --json` output?)")
    largest = max(bandwidth, key=lambda r: r["size_bytes"])
    transport = str(largest.get("transport", "measured"))
    lat = latency[0].get(f"{transport}_p50_us", 0.0) if latency else 0.0
    link = MeasuredLink(
        bandwidth_gb_per_s=float(largest["algbw_gbps"]),
        latency_us=float(lat),
        source=f"afd bench transport ({transport}, {largest['size_bytes']} B frames) in {source}",
    )
    return Calibration(links={"measured": link, f"measured-{transport}": link})


def _validate(data: dict[str, Any], source: str) -> Calibration:
    try:
        return Calibration.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"  - {'.'.join(str(p) for p in item['loc'])}: {message}")
        raise ConfigError(f"invalid calibration {source}:\n" + "\n".join(problems)) from None


def load_calibration(path: Path, kind_of_device: Any) -> Calibration:
    """Read a calibration file, a router cluster view (JSON) or `afd bench transport --json` output."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read calibration {path}: {error.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        rows = [json.loads(line) for line in lines]
        if rows and all(isinstance(r, dict) and r.get("kind") in ("bandwidth", "latency") for r in rows):
            return from_transport_rows(rows, str(path))
    except json.JSONDecodeError:
        pass
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as error:
        raise ConfigError(f"calibration {path} is neither JSON nor YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"calibration {path}: expected a mapping, got {type(data).__name__}")
    if "nodes" in data:
        return from_cluster_view(data, kind_of_device)
    return _validate(data, str(path))
