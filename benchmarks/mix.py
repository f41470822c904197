"""`afd bench mix --mixes mixes.yaml`: real hardware mixes, one after the other, measured beside the planner.

For each mix of the file (pools of attention and FFN nodes, each pool with its node count, CPU limit and
threads; microbatches m; a link cap; the batch per attention node; the wire dtype) it
1. brings the cluster up on the mix testbed (a launcher the CLI passes in: orchestration/testbed/launch.py puts
   every node in its cgroup with the pool's CFS quota and in its own network namespace on a tbf-capped veth),
2. reads each node's capacity profile from the router (GET /afd/v1/cluster: attention µs per token at a
   context, FFN µs per token-expert pair, measured by the node itself at start-up inside its cgroup),
3. runs a short warm-up and then the serving benchmark (benchmarks/serve.py) at a concurrency of
   batch x attention nodes, recording the kernel's CPU time of every node (cpuacct), the router's FFN
   busy fractions and its per-layer exchange counters (round trip, time blocked in combine) over the run,
4. asks the planner (afd.planning.predict) for the same mix, fitted to those profiles, the mix's CPU quotas
   (`CpuQuota`) and its link (the cap's bandwidth, the file's per-exchange latency),
and writes one JSON file: per mix, every field `afd bench serve --save-result` writes (vLLM's) plus the
mix (per-role kind, count, CPU limit, threads), A:F ratio, m, link, predicted and measured figures and the
relative error; then a markdown report with the table and plots (measured vs predicted per mix, and the
Pareto front of tok/s per accelerator against TPOT).

Measured decode tok/s is concurrency / mean TPOT (the decode rate of a full batch, what the cost model
predicts); `output_throughput` (vLLM's, with prefill and the ramp at both ends) is kept beside it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from afd.builtin_model import builtin_model_dir
from afd.errors import AfdError, ConfigError
from afd.model_spec import ModelSpec
from afd.planning import CpuQuota, Link, Mix, Prediction, predict
from afd.planning.calibration import AttentionMeasurement, FfnMeasurement
from benchmarks.serve import ServeBenchmarkConfig, run_serve_benchmark
from benchmarks.serve_cluster import client_cpu_model, exchange_fields

RESULT_VERSION = 1
MIX_RATE_BISECTIONS = 30
"""Bisection steps of predict_mix's fixed point (the rate to within 1e-9 of the fastest prediction)."""
MIN_NODE_CORES = 0.25
"""Floor of the cores the nodes are predicted to share, whatever the router and the client are predicted to take."""
ROLES = ("attention", "ffn")
CLIENT = "client"
"""Role and id of the load generator (this process) in the measured CPU time (MixMeasurement.busy)."""
MAX_BACKGROUND_CORES = 0.9
"""Upper bound of a fitted background share of a node (fit_background_cores): a slope at or above a core is
noise of the host, not threads of the node."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class PoolSpec(_Model):
    """One pool of a mix: how many nodes and what hardware each gets."""

    count: int = Field(ge=1, le=8)
    """Nodes of the pool (this machine runs every one of them)."""
    cpu: float | None = Field(default=None, gt=0, le=64)
    """CPU limit of each node in cores (a CFS quota, as Kubernetes' limits.cpu); null: no limit."""
    threads: int = Field(default=1, ge=1, le=64)
    """torch threads of each node."""
    kind: str = "cpu"
    """Catalog kind the planner predicts the pool as (afd/planning/hardware.yaml)."""


class MixSpec(_Model):
    """One mix: the two pools, the microbatches, the link and the batch."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
    """Label in the result and the report (letters, digits, `_.-`)."""
    attention: PoolSpec
    """The attention pool."""
    ffn: PoolSpec
    """The FFN pool."""
    microbatches: int = Field(default=1, ge=1, le=8)
    """Ping-pong microbatches m of every attention node."""
    link_mbit: float | None = Field(default=None, gt=0)
    """Cap of each node's link, each direction, 1e6 bit/s (tc tbf); null: the veth uncapped."""
    batch_per_attention_node: int = Field(default=4, ge=1, le=256)
    """Requests in one attention node's decode batch: the benchmark's concurrency is this x attention nodes."""
    wire_dtype: Literal["auto", "bf16", "fp8"] = "auto"
    """Hidden states from attention to FFN (`--wire-dtype`): auto (the model dtype), bf16, or fp8 (e4m3 with a
    float32 scale per token); the partial sums come back in the model dtype."""

    @property
    def concurrency(self) -> int:
        return self.batch_per_attention_node * self.attention.count

    @property
    def af_ratio(self) -> str:
        return f"{self.attention.count}:{self.ffn.count}"


class Workload(_Model):
    """What every mix serves."""

    requests_per_slot: int = Field(default=3, ge=1, le=100)
    """Requests per slot of the batch: num_prompts = this x concurrency (all sent at once, capped)."""
    input_len: int = Field(default=16, ge=1)
    """Prompt tokens per request."""
    output_len: int = Field(default=48, ge=2)
    """Generated tokens per request (ignore_eos)."""
    repeats: int = Field(default=3, ge=1, le=20)
    """Timed runs per mix; the result is the one with the lowest mean TPOT (other tenants of the host only
    ever slow a run down), every run's TPOT is kept (`measured.runs_tpot_ms`)."""
    warmup_output_len: int = Field(default=4, ge=1)
    """Tokens of each warm-up request (one per slot) before the timed run; 0 warm-up is not offered: the
    first steps of a fresh node include one-off costs (allocator, thread pools) no mix should be charged."""
    seed: int = 0
    """Seed of the prompts."""


def _calibration_shape(mix: MixSpec | None, what: str, ffn_nodes: int) -> MixSpec | None:
    """A calibration mix is 1 attention node and `ffn_nodes` FFN nodes, no CPU limit, m = 1 (or absent)."""
    if mix is not None and (
        mix.attention.count != 1
        or mix.ffn.count != ffn_nodes
        or mix.microbatches != 1
        or mix.attention.cpu
        or mix.ffn.cpu
    ):
        nodes = "1 FFN node" if ffn_nodes == 1 else f"{ffn_nodes} FFN nodes"
        raise ValueError(f"{what} must have 1 attention and {nodes}, no CPU limit and m = 1")
    return mix


class MixesFile(_Model):
    """A mixes file: `version: 1`, optional `model`, `workload` and link figures, and the `mixes`."""

    version: Literal[1] = 1
    """File format version."""
    model: str | None = None
    """Checkpoint directory (relative paths from the file's directory); null: the built-in demo model."""
    workload: Workload = Field(default_factory=Workload)
    """The requests every mix serves."""
    link_latency_us: float = Field(default=160.0, ge=0)
    """One-way latency of one A<->F exchange, microseconds, where no calibration mix fits it (`afd bench
    transport --transport grpc` reports it as grpc_p50_us)."""
    uncapped_link_gb_per_s: float = Field(default=2.0, gt=0)
    """Bandwidth the planner assumes for a mix without link_mbit (a veth through the bridge), 1e9 B/s."""
    calibration_mix: MixSpec | None = Field(
        default_factory=lambda: MixSpec(
            name="calibration",
            attention=PoolSpec(count=1),
            ffn=PoolSpec(count=1),
            batch_per_attention_node=4,
        )
    )
    """Run first: 1 attention + 1 FFN node without CPU limits, m = 1; its CPU times and TPOT give the
    per-call costs and the exchange latency every prediction uses (fit_host); null: none (no per-call
    costs, link_latency_us)."""
    fanout_calibration_mix: MixSpec | None = Field(
        default_factory=lambda: MixSpec(
            name="calibration-fanout",
            attention=PoolSpec(count=1),
            ffn=PoolSpec(count=2),
            batch_per_attention_node=4,
        )
    )
    """Run second (with a calibration mix): 1 attention + 2 FFN nodes without CPU limits, m = 1; splits the
    attention node's per-call cost into a part per layer and a part per FFN node it sends to (fit_fanout)."""
    link_calibration: bool = True
    """With a calibration mix: run it once more on every link cap the mixes use (link_calibration_mixes), and
    predict the mixes on that cap with the exchange latency fitted there (fit_link) instead of the uncapped
    one: an exchange over a slow cap takes longer than its bytes / rate by more than the uncapped latency
    (the stack's headers, gRPC's framing and control frames, each packet's wait in the bucket)."""
    rounds: int = Field(default=1, ge=1, le=10)
    """Times the whole list (calibration mixes first, then the mixes) is run, each mix brought up afresh every
    round; a mix keeps its best round. Above 1 a busy spell of the host's other tenants slows one round of
    every mix instead of all runs of the mixes it falls on (the sides alternate)."""
    pool_profiles: bool = True
    """Predict every mix from the median start-up profile of its nodes' role and thread count over every launch
    of the run (calibration mixes and rounds included), not from the profile its own nodes took at start: one
    start-up timing moves by half or more between launches on a shared host (`afd status`'s measured µs),
    while the per-call costs were fitted against the calibration's; the nodes' own stay in the result
    (`measured_us_at_start`)."""
    fit_background: bool = False
    """With a calibration mix and link calibration: fit the CPU each node takes beside its compute (its server's
    and transport's threads) from the calibration mix's runs at different step lengths (fit_background_cores),
    and count it against CPU quotas and the shared cores. False (the default): none, the per-call costs carry it
    at the calibration's step length. Off because in the two runs that compared both (README, "Measuring hardware
    mixes") it raised the mean error, from 27 to 31 % (0.22-0.24 cores fitted, more than a quarter-core FFN node
    was measured to leave its compute; the host drifted 30 % in that run, which the slope also takes in) and from
    11 to 16 % (0.05-0.09 cores, a quiet run)."""
    recheck_calibration: bool = True
    """With a calibration mix: run it once more after the mixes (`calibration.recheck_run`), and report its
    decode tok/s against the run the fit rests on (`summary.calibration_drift_decode_tok_s`): how far this host
    moved while the mixes ran, which prediction errors of that size cannot be told from."""
    mixes: list[MixSpec] = Field(min_length=1)
    """The mixes, run in this order."""

    @field_validator("calibration_mix")
    @classmethod
    def _reference(cls, mix: MixSpec | None) -> MixSpec | None:
        return _calibration_shape(mix, "the calibration mix", ffn_nodes=1)

    @field_validator("fanout_calibration_mix")
    @classmethod
    def _fanout(cls, mix: MixSpec | None) -> MixSpec | None:
        return _calibration_shape(mix, "the fanout calibration mix", ffn_nodes=2)

    @field_validator("mixes")
    @classmethod
    def _unique_names(cls, mixes: list[MixSpec]) -> list[MixSpec]:
        names = [m.name for m in mixes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"mix names must be unique; repeated: {', '.join(duplicates)}")
        return mixes

    @model_validator(mode="after")
    def _fits_context(self) -> MixesFile:
        if self.workload.input_len + self.workload.output_len > 4096:
            raise ValueError("workload input_len + output_len must be <= 4096 tokens")
        return self


def load_mixes(path: Path) -> MixesFile:
    """Read and validate a mixes file; ConfigError names each bad field by its path (mixes.2.ffn.cpu)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read mixes file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"mixes file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"mixes file {path}: expected a mapping with `mixes:`, got {type(data).__name__}")
    try:
        mixes = MixesFile.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            where = ".".join(str(p) for p in item["loc"]) or "(file)"
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"  - {where}: {message}")
        raise ConfigError(f"invalid mixes file {path}:\n" + "\n".join(problems)) from None
    if mixes.model is not None and not Path(mixes.model).is_absolute():
        mixes = mixes.model_copy(update={"model": str((path.parent / mixes.model).resolve())})
    return mixes


# ---- what the launcher gives the benchmark ---------------------------------------------------------------
@dataclass
class RunningMix:
    """A mix's cluster while it runs, as the launcher exposes it."""

    base_url: str
    """Router root URL (http://host:port)."""
    cluster_view: Callable[[], dict[str, Any]]
    """GET /afd/v1/cluster."""
    cpu_usage_ns: Callable[[], dict[str, int]]
    """Node id -> CPU time so far (the kernel's, per node cgroup), ns."""
    throttling: Callable[[], dict[str, dict[str, int]]]
    """Node id -> the kernel's CFS throttling counters."""
    link_burst_bytes: int = 0
    """Bytes of a message the capped link passes at once (its token bucket); 0: uncapped."""
    exchange_totals: Callable[[Mapping[str, float] | None], dict[str, float]] | None = None
    """The router's per-layer exchange counters once settled (serve_cluster.settled_exchange_totals; the argument:
    the previous reading, which a settled one must differ from); None where the launcher cannot read them."""


#: Brings a mix up (model directory, mix) and tears it down on exit; raises AfdError where it cannot.
Launcher = Callable[[Path, MixSpec], AbstractContextManager[RunningMix]]


# ---- prediction ------------------------------------------------------------------------------------------
def measurements(view: Mapping[str, Any]) -> tuple[tuple[AttentionMeasurement, ...], tuple[FfnMeasurement, ...]]:
    """The start-up profiles of the view's attention and FFN nodes."""
    attention: list[AttentionMeasurement] = []
    ffn: list[FfnMeasurement] = []
    for node in view.get("nodes", []):
        measured = node.get("measured_us") or {}
        if node.get("role") == "attention" and (measured.get("per_token") or 0) > 0:
            context = int(measured.get("at_context_len") or 128)
            attention.append(AttentionMeasurement(us_per_token=measured["per_token"], context_len=context))
        elif node.get("role") == "ffn" and (measured.get("per_token_expert") or 0) > 0:
            ffn.append(FfnMeasurement(us_per_token_expert=measured["per_token_expert"]))
    return tuple(attention), tuple(ffn)


@dataclass(frozen=True)
class HostCalibration:
    """What the calibration mix measured on this host beyond the nodes' start-up profiles."""

    attention_call_us: float
    """Attention node CPU time per layer beyond its attention kernels (Mix.attention_call_us), µs."""
    ffn_call_us: float
    """FFN node CPU time per layer and frame beyond its expert kernels (Mix.ffn_call_us), µs."""
    link_latency_us: float
    """One-way latency of one A<->F exchange (the step's time when neither node computes), µs."""
    source: str
    """What it rests on."""
    attention_call_per_ffn_node_us: float = 0.0
    """Attention node CPU time per layer per FFN node it sends to (a frame to encode, send and combine), µs;
    Mix.attention_call_us = attention_call_us + this x FFN nodes."""
    shared_cpu_s_per_token: float = 0.0
    """CPU time the router and the load generator (this process) take per output token, seconds: what they
    take of the host's cores beside the nodes scales with the mix's token rate (Mix.shared_cores)."""
    link_latency_us_by_mbit: dict[float, float] = field(default_factory=dict)
    """Link cap (Mbit/s) -> one-way exchange latency fitted on it (fit_link); mixes on other caps take
    link_latency_us less what the cap's token bucket passes at once."""
    ffn_kernel_scale: float = 1.0
    """Factor on the FFN nodes' start-up timings of their experts (fit_fanout): what an FFN node's CPU time per
    layer says its kernels take, against what one start-up timing of one expert says. Below 1 where a layer's
    experts cost less than that many separate timings (one fused call per layer, its fixed cost paid once)."""
    ffn_points_us: tuple[tuple[float, float], ...] = ()
    """(modelled expert kernels, measured CPU time) per layer of an FFN node, µs, one pair per calibration run
    with a different FFN node count: what fit_fanout fits ffn_call_us and ffn_kernel_scale to."""
    attention_background_cores: float = 0.0
    """CPU an attention node takes beside its compute, however long the step, cores (fit_background_cores);
    taken off its measured CPU time before the per-call costs are fitted (Mix.attention_background_cores)."""
    ffn_background_cores: float = 0.0
    """The same for an FFN node."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention_call_us": round(self.attention_call_us, 3),
            "attention_call_per_ffn_node_us": round(self.attention_call_per_ffn_node_us, 3),
            "ffn_call_us": round(self.ffn_call_us, 3),
            "link_latency_us": round(self.link_latency_us, 3),
            "shared_cpu_us_per_token": round(self.shared_cpu_s_per_token * 1e6, 3),
            "ffn_kernel_scale": round(self.ffn_kernel_scale, 4),
            "attention_background_cores": round(self.attention_background_cores, 4),
            "ffn_background_cores": round(self.ffn_background_cores, 4),
            "link_latency_us_by_mbit": {
                f"{cap:g}": round(us, 3) for cap, us in sorted(self.link_latency_us_by_mbit.items())
            },
            "source": self.source,
        }


def file_host_calibration(mixes: MixesFile) -> HostCalibration:
    """No calibration mix: no per-call costs, the file's link latency."""
    return HostCalibration(0.0, 0.0, mixes.link_latency_us, "mixes file (no calibration mix)")


def planner_mix(
    spec: MixSpec,
    mixes: MixesFile,
    model: ModelSpec,
    view: Mapping[str, Any],
    host: HostCalibration,
    link_burst_bytes: int = 0,
    tok_s: float = 0.0,
) -> Mix:
    """The planner's Mix for `spec`, fitted to the nodes' own profiles in `view` and the host's calibration.

    A capped link's token bucket lets the first `link_burst_bytes` of each message through at once, so each
    one-way exchange takes that much less than bytes / rate: it comes off the per-exchange latency.
    Every node runs on this host: they share its cores less what the router and the load generator take at
    `tok_s` output tokens per second (predict_mix finds the rate the mix runs at).
    """
    attention, ffn = measurements(view)
    if not attention or not ffn:
        raise AfdError("the router's view has no measured attention or FFN costs: cannot fit the prediction")
    if spec.link_mbit is not None:
        rate = spec.link_mbit * 1e6 / 8
        fitted = host.link_latency_us_by_mbit.get(spec.link_mbit)
        if fitted is not None:
            latency, source = fitted, f"tc tbf cap, latency fitted on it; {host.source}"
        else:
            latency, source = (
                max(0.0, host.link_latency_us - link_burst_bytes / rate * 1e6),
                f"tc tbf cap; {host.source}",
            )
        link = Link(f"tbf {spec.link_mbit:g} Mbit/s", rate, latency, source)
    else:
        rate = mixes.uncapped_link_gb_per_s * 1e9
        link = Link("veth (uncapped)", rate, host.link_latency_us, f"mixes file; {host.source}")
    shared_cores = max(MIN_NODE_CORES, (os.cpu_count() or 1) - host.shared_cpu_s_per_token * tok_s)
    element_bytes = 4.0 if model.dtype in ("float32", "fp32") else 2.0
    # fp8: one byte per element plus the token's float32 scale (afd.ffn_messages.quantize_fp8)
    dispatch_bytes = {"auto": element_bytes, "bf16": 2.0, "fp8": 1.0 + 4.0 / model.hidden_size}[spec.wire_dtype]
    return Mix(
        attention_kind=spec.attention.kind,
        attention_count=spec.attention.count,
        ffn_kind=spec.ffn.kind,
        ffn_count=spec.ffn.count,
        microbatches=spec.microbatches,
        batch_per_attention_node=spec.batch_per_attention_node,
        context_len=mixes.workload.input_len + mixes.workload.output_len // 2,
        link=link,
        attention_measured=attention,
        ffn_measured=ffn,
        activation_bytes=element_bytes,
        dispatch_activation_bytes=dispatch_bytes,
        overlap=False,
        shared_cores=shared_cores,
        attention_quota=CpuQuota(spec.attention.cpu, spec.attention.threads) if spec.attention.cpu else None,
        ffn_quota=CpuQuota(spec.ffn.cpu, spec.ffn.threads) if spec.ffn.cpu else None,
        attention_call_us=host.attention_call_us + host.attention_call_per_ffn_node_us * spec.ffn.count,
        # an FFN node decodes and answers one frame per attention node per layer and microbatch
        ffn_call_us=host.ffn_call_us * spec.attention.count,
        ffn_kernel_scale=host.ffn_kernel_scale,
        attention_background_cores=host.attention_background_cores,
        ffn_background_cores=host.ffn_background_cores,
    )


def predict_mix(
    spec: MixSpec,
    mixes: MixesFile,
    model: ModelSpec,
    view: Mapping[str, Any],
    host: HostCalibration,
    link_burst_bytes: int = 0,
) -> Prediction:
    """The prediction of `spec` at the token rate it predicts for itself.

    The faster a mix runs, the more of the shared cores the router and the load generator take from its nodes
    (host.shared_cpu_s_per_token), which slows it: the predicted rate is the fixed point of that loop, found by
    bisection (the rate predicted at an assumed rate falls as the assumed rate rises).
    """

    def at(tok_s: float) -> Prediction:
        return predict(model, planner_mix(spec, mixes, model, view, host, link_burst_bytes, tok_s))

    fastest = at(0.0)
    if host.shared_cpu_s_per_token <= 0:
        return fastest
    low, high = 0.0, fastest.decode_tok_s
    for _ in range(MIX_RATE_BISECTIONS):
        middle = (low + high) / 2
        if at(middle).decode_tok_s > middle:
            low = middle
        else:
            high = middle
    return at(low)


# ---- one mix ---------------------------------------------------------------------------------------------
def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, None where either is missing or measured is 0."""
    if predicted is None or measured is None or not measured or not math.isfinite(predicted):
        return None
    return (predicted - measured) / measured


def _role_of(node_id: str, view: Mapping[str, Any]) -> str:
    for node in view.get("nodes", []):
        if node.get("node_id") == node_id:
            return str(node.get("role"))
    return node_id if node_id in ("router", CLIENT) else "unknown"


def busy_by_role(
    before: Mapping[str, int], after: Mapping[str, int], seconds: float, view: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """Per role: mean and max over its nodes of CPU time / wall time (cores busy) during the run."""
    per_role: dict[str, list[float]] = {}
    for node_id, end in after.items():
        if node_id in before and seconds > 0:
            per_role.setdefault(_role_of(node_id, view), []).append((end - before[node_id]) / 1e9 / seconds)
    return {
        role: {"mean_cores": round(sum(v) / len(v), 4), "max_cores": round(max(v), 4), "nodes": len(v)}
        for role, v in sorted(per_role.items())
    }


def _pool_json(pool: PoolSpec, view: Mapping[str, Any], role: str) -> dict[str, Any]:
    nodes = [n for n in view.get("nodes", []) if n.get("role") == role]
    return {
        "kind": pool.kind,
        "count": pool.count,
        "cpu_limit_cores": pool.cpu,
        "threads": pool.threads,
        "device_kind": sorted({str(n.get("device_kind")) for n in nodes}),
        "addresses": sorted(str(n.get("address")) for n in nodes),
        "measured_us": [n.get("measured_us") for n in nodes],  # what the prediction used (MixesFile.pool_profiles)
        # each node's own start-up profile, as the router has it
        "measured_us_at_start": [n.get("measured_us_at_start", n.get("measured_us")) for n in nodes],
    }


ProfileKey = tuple[str, int, int]  # role, the pool's threads, the profile's context length


def _profile_key(spec: MixSpec, node: Mapping[str, Any]) -> ProfileKey | None:
    role = node.get("role")
    pool = spec.attention if role == "attention" else spec.ffn if role == "ffn" else None
    measured = node.get("measured_us") or {}
    if pool is None or not measured:
        return None
    return str(role), pool.threads, int(measured.get("at_context_len") or 0)


def pooled_profiles(launches: list[tuple[MixSpec, MixMeasurement]]) -> dict[ProfileKey, dict[str, float]]:
    """(role, threads, context) -> the median of each figure of every node's start-up profile of that key over
    `launches` (MixesFile.pool_profiles)."""
    samples: dict[ProfileKey, dict[str, list[float]]] = {}
    for spec, measured in launches:
        for node in measured.view.get("nodes", []):
            key = _profile_key(spec, node)
            if key is None:
                continue
            for name, value in node["measured_us"].items():
                if name != "at_context_len" and isinstance(value, int | float) and value > 0:
                    samples.setdefault(key, {}).setdefault(name, []).append(float(value))
    return {key: {name: statistics.median(v) for name, v in figures.items()} for key, figures in samples.items()}


def with_pooled_profiles(
    spec: MixSpec, measured: MixMeasurement, pooled: Mapping[ProfileKey, Mapping[str, float]]
) -> MixMeasurement:
    """`measured` with each node's profile replaced by the pooled one of its key (its own kept beside it)."""
    nodes = []
    for node in measured.view.get("nodes", []):
        key = _profile_key(spec, node)
        if key is not None and key in pooled:
            node = {
                **node,
                "measured_us_at_start": node["measured_us"],
                "measured_us": {**node["measured_us"], **pooled[key]},
            }
        nodes.append(node)
    return replace(measured, view={**measured.view, "nodes": nodes})


def mix_row(
    spec: MixSpec,
    serve: Mapping[str, Any],
    prediction: Prediction,
    view: Mapping[str, Any],
    busy: Mapping[str, Any],
    ffn_busy_fraction: Mapping[str, float],
    throttled: Mapping[str, Any],
) -> dict[str, Any]:
    """One mix's result: `serve` (vLLM's fields) plus the mix, the prediction, the measurement and errors."""
    tpot = serve.get("mean_tpot_ms") or None
    decode = spec.concurrency * 1000.0 / tpot if tpot else None
    accelerators = spec.attention.count + spec.ffn.count
    measured = {
        "decode_tok_s": decode,
        "output_throughput": serve.get("output_throughput"),
        "tok_s_per_accelerator": decode / accelerators if decode else None,
        "tpot_ms": tpot,
        "ttft_ms": serve.get("mean_ttft_ms"),
        "busy": dict(busy),
        "ffn_busy_fraction": dict(ffn_busy_fraction),
        "cpu_throttling": dict(throttled),
    }
    predicted = prediction.to_dict()
    return {
        **serve,
        "mix": spec.name,
        "attention": _pool_json(spec.attention, view, "attention"),
        "ffn": _pool_json(spec.ffn, view, "ffn"),
        "af_ratio": spec.af_ratio,
        "microbatches": spec.microbatches,
        "batch_per_attention_node": spec.batch_per_attention_node,
        "link_mbit": spec.link_mbit,
        "wire_dtype": spec.wire_dtype,
        "accelerators": accelerators,
        "predicted": predicted,
        "measured": measured,
        "error": {
            "decode_tok_s": relative_error(prediction.decode_tok_s, decode),
            "output_throughput": relative_error(prediction.decode_tok_s, serve.get("output_throughput")),
            "tpot_ms": relative_error(prediction.tpot_ms, tpot),
        },
    }


def _serve_config(base_url: str, spec: MixSpec, workload: Workload, prompts: int, output_len: int) -> Any:
    return ServeBenchmarkConfig(
        base_url=base_url,
        num_prompts=prompts,
        max_concurrency=spec.concurrency,
        random_input_len=workload.input_len,
        random_output_len=output_len,
        seed=workload.seed,
        request_timeout_s=120.0,
        cluster_poll_interval_s=0.5,
    )


@dataclass
class MixMeasurement:
    """What one mix's run measured."""

    serve: dict[str, Any]
    """The serving benchmark's result (vLLM's fields)."""
    view: dict[str, Any]
    """The router's cluster view at start (the nodes' profiles)."""
    busy: dict[str, dict[str, float]]
    """Per role: CPU cores busy during the run (the kernel's CPU time of each node)."""
    ffn_busy_fraction: dict[str, float]
    """FFN node -> busy fraction of its last heartbeat (the router's afd:ffn_busy_fraction)."""
    throttled: dict[str, dict[str, int]]
    """Node -> CFS periods and throttled periods/time during the run."""
    link_burst_bytes: int = 0
    """The capped link's token bucket, bytes (RunningMix.link_burst_bytes)."""
    runs_tpot_ms: tuple[float, ...] = ()
    """Mean TPOT of every timed run; the result is the run with the lowest (the least disturbed)."""
    exchange: dict[str, float | None] | None = None
    """The kept run's attention-FFN exchanges (serve_cluster.exchange_fields: round trip, time blocked in
    combine, share hidden); None where the launcher does not read the router's counters."""


def measure_mix(
    spec: MixSpec, mixes: MixesFile, model_dir: Path, launch: Launcher, phase: Callable[[str], None]
) -> MixMeasurement:
    """Bring `spec` up, warm up, serve, read the counters; the cluster is down on return."""
    workload = mixes.workload
    phase("starting nodes")
    with launch(model_dir, spec) as running:
        view = running.cluster_view()
        phase("warm-up")
        run_serve_benchmark(
            _serve_config(running.base_url, spec, workload, spec.concurrency, workload.warmup_output_len)
        )
        config = _serve_config(
            running.base_url, spec, workload, workload.requests_per_slot * spec.concurrency, workload.output_len
        )
        runs = []
        for run in range(workload.repeats):
            phase(f"serving {run + 1}/{workload.repeats}")
            exchanges_before = running.exchange_totals(None) if running.exchange_totals else None
            # this process is the load generator: its CPU time over the run is the client's
            usage_before = {**running.cpu_usage_ns(), CLIENT: time.process_time_ns()}
            throttle_before = running.throttling()
            started = time.monotonic()
            serve = run_serve_benchmark(config)
            elapsed = time.monotonic() - started
            usage_after = {**running.cpu_usage_ns(), CLIENT: time.process_time_ns()}
            throttle_after = running.throttling()
            after = running.cluster_view()  # FFN busy fractions from the last heartbeats of the run
            exchange = None
            if running.exchange_totals and exchanges_before is not None:
                exchange = exchange_fields(exchanges_before, running.exchange_totals(exchanges_before))
            runs.append((serve, elapsed, usage_before, usage_after, throttle_before, throttle_after, after, exchange))
        phase("stopping")
    tpots = tuple(float(r[0].get("mean_tpot_ms") or math.inf) for r in runs)
    # Other tenants of the host only ever slow a run down: the fastest run is the least disturbed one.
    serve, elapsed, usage_before, usage_after, throttle_before, throttle_after, after, exchange = runs[
        tpots.index(min(tpots))
    ]
    if not serve.get("completed"):
        errors = [e for e in serve.get("errors", []) if e]
        raise AfdError(f"mix {spec.name}: every request failed; first error: {errors[0] if errors else '?'}")
    ffn_nodes = [n for n in after.get("nodes", []) if n.get("role") == "ffn"]
    throttled = {
        node_id: {
            key: counters.get(key, 0) - throttle_before.get(node_id, {}).get(key, 0)
            for key in ("nr_periods", "nr_throttled", "throttled_time")
        }
        for node_id, counters in throttle_after.items()
    }
    return MixMeasurement(
        serve=serve,
        view=view,
        busy=busy_by_role(usage_before, usage_after, elapsed, view),
        ffn_busy_fraction={str(n["node_id"]): float(n.get("busy_fraction") or 0.0) for n in ffn_nodes},
        throttled=throttled,
        link_burst_bytes=running.link_burst_bytes,
        runs_tpot_ms=tpots,
        exchange=exchange,
    )


def _calibration_run(
    spec: MixSpec, measured: MixMeasurement, mixes: MixesFile, model: ModelSpec, what: str
) -> tuple[float, float, float, Prediction]:
    """What a calibration mix's run gives its fit: (TPOT ms, attention and FFN nodes' mean busy cores, the cost
    model's prediction of the mix with zero per-call costs and latency, i.e. the kernels and the bytes only)."""
    step = _step_and_busy(measured)
    if step is None:
        raise AfdError(f"the {what} measured no TPOT or no CPU time (is cpuacct mounted?)")
    zero = HostCalibration(0.0, 0.0, 0.0, "none")
    base = predict(model, planner_mix(spec, mixes, model, measured.view, zero, measured.link_burst_bytes))
    return (*step, base)


def _step_and_busy(measured: MixMeasurement) -> tuple[float, float, float] | None:
    """(TPOT ms, attention and FFN nodes' mean busy cores) of a run, None where it measured no TPOT or CPU time."""
    tpot_ms = measured.serve.get("mean_tpot_ms")
    busy_a = measured.busy.get("attention", {}).get("mean_cores")
    busy_f = measured.busy.get("ffn", {}).get("mean_cores")
    if not tpot_ms or busy_a is None or busy_f is None:
        return None
    return float(tpot_ms), float(busy_a), float(busy_f)


def fit_background_cores(runs: list[MixMeasurement]) -> tuple[float, float]:
    """(attention, FFN) node CPU taken beside the compute, cores: the slope of a node's CPU time per step against
    the step's length over runs of one shape (the calibration mix on its links), whose compute per step is the
    same; a slower link lengthens the step and adds only what the nodes' other threads take in the meantime.
    (0, 0) with fewer than two runs or steps too close to tell apart (within 20 %); each in [0,
    MAX_BACKGROUND_CORES]."""
    measured = [step for step in map(_step_and_busy, runs) if step is not None]
    points = [(tpot_ms, busy_a * tpot_ms, busy_f * tpot_ms) for tpot_ms, busy_a, busy_f in measured]
    steps = [step for step, _, _ in points]
    if len(points) < 2 or max(steps) < 1.2 * min(steps):
        return 0.0, 0.0
    mean_step = sum(steps) / len(steps)
    spread = sum((step - mean_step) ** 2 for step in steps)

    def slope(index: int) -> float:
        mean_cpu = sum(p[index] for p in points) / len(points)
        value = sum((p[0] - mean_step) * (p[index] - mean_cpu) for p in points) / spread
        return min(max(0.0, value), MAX_BACKGROUND_CORES)

    return slope(1), slope(2)


def fit_host(
    spec: MixSpec,
    measured: MixMeasurement,
    mixes: MixesFile,
    model: ModelSpec,
    background: tuple[float, float] = (0.0, 0.0),
) -> HostCalibration:
    """The per-call costs and the exchange latency of this host, from the calibration mix's run.

    The calibration mix (1 attention + 1 FFN node, no CPU limit, m = 1) runs its two nodes one after the
    other, so per decode step: the attention node's CPU time = its kernels (the profile's T_a, summed over the
    layers, with the head) + layers x attention_call_us; the FFN node's likewise; and the rest of the step,
    when neither computes, is the link: bytes / bandwidth + 2 x layers x the one-way latency. The router's and
    the load generator's CPU time over the output tokens of the run is their cost per token. `background`: the
    (attention, FFN) cores a node takes beside its compute (fit_background_cores), not part of its calls.
    """
    tpot_ms, busy_a, busy_f, base = _calibration_run(spec, measured, mixes, model, "calibration mix")
    busy_a, busy_f = max(0.0, busy_a - background[0]), max(0.0, busy_f - background[1])
    shared_cores = sum(measured.busy.get(role, {}).get("mean_cores", 0.0) for role in ("router", CLIENT))
    output_tok_s = float(measured.serve.get("output_throughput") or 0.0)
    shared_per_token = shared_cores / output_tok_s if output_tok_s > 0 else 0.0
    step_us = tpot_ms * 1000.0
    layers = model.num_layers
    cpu_a, cpu_f = busy_a * step_us, busy_f * step_us
    call_a = max(0.0, cpu_a - base.attention_us) / layers
    call_f = max(0.0, cpu_f - base.ffn_us) / layers
    residual = step_us - cpu_a - cpu_f - base.link_us  # base.link_us: the bytes' time only (latency 0)
    latency = residual / (2 * layers) if residual > 0 else mixes.link_latency_us
    source = (
        f"calibration mix {spec.name}: TPOT {tpot_ms:.3f} ms, attention node {busy_a:.3f} cores busy, "
        f"FFN node {busy_f:.3f} cores busy, router and client {shared_cores:.3f} cores at {output_tok_s:.1f} "
        "output tok/s"
    )
    return HostCalibration(
        call_a,
        call_f,
        latency,
        source,
        shared_cpu_s_per_token=shared_per_token,
        ffn_points_us=((base.ffn_us / layers, cpu_f / layers),),
        attention_background_cores=background[0],
        ffn_background_cores=background[1],
    )


def fit_fanout(
    host: HostCalibration, spec: MixSpec, measured: MixMeasurement, mixes: MixesFile, model: ModelSpec
) -> HostCalibration:
    """`host` (fitted on 1 attention + 1 FFN node) split by the fanout calibration mix (1 attention + 2 FFN
    nodes). The attention node's per-layer call cost is a + b x FFN nodes (one frame each), so b is the rise
    from one FFN node to two and a what remains. An FFN node's CPU time per layer is ffn_call_us + s x its
    modelled expert kernels (which halve with the experts it holds): the two runs give the two unknowns
    (fit_ffn_line), so a per-frame cost that does not halve is not read as kernel time.
    """
    tpot_ms, busy_a, busy_f, base = _calibration_run(spec, measured, mixes, model, "fanout calibration mix")
    busy_a = max(0.0, busy_a - host.attention_background_cores)
    busy_f = max(0.0, busy_f - host.ffn_background_cores)
    step_us, layers = tpot_ms * 1000.0, model.num_layers
    call_two = max(0.0, busy_a * step_us - base.attention_us) / layers  # a + 2b
    call_one = host.attention_call_us + host.attention_call_per_ffn_node_us  # a + b
    per_node = max(0.0, call_two - call_one)
    points = (*host.ffn_points_us, (base.ffn_us / layers, busy_f * step_us / layers))
    ffn_call, scale = fit_ffn_line(points)
    source = (
        f"{host.source}; fanout mix {spec.name}: TPOT {tpot_ms:.3f} ms, attention node {busy_a:.3f} cores, "
        f"FFN nodes {busy_f:.3f} cores busy each"
    )
    return replace(
        host,
        attention_call_us=max(0.0, call_one - per_node),
        ffn_call_us=ffn_call,
        source=source,
        attention_call_per_ffn_node_us=per_node,
        ffn_kernel_scale=scale,
        ffn_points_us=points,
    )


def fit_ffn_line(points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(call, scale) of measured = call + scale x kernel over (kernel, measured) points, least squares, both
    >= 0 (a cost is not negative): scale 0 where the CPU time does not fall with the kernels (call = the mean),
    call 0 where the line would cross below it (scale through the origin). One point: scale 1, call the rest."""
    if not points:
        return 0.0, 1.0
    n = len(points)
    mean_k = sum(k for k, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    if n < 2 or spread <= 1e-12 * max(mean_k * mean_k, 1e-300):
        return max(0.0, mean_y - mean_k), 1.0
    scale = sum((k - mean_k) * (y - mean_y) for k, y in points) / spread
    if scale <= 0:
        return max(0.0, mean_y), 0.0
    call = mean_y - scale * mean_k
    if call < 0:
        return 0.0, sum(k * y for k, y in points) / sum(k * k for k, _ in points)
    return call, scale


def link_calibration_mixes(mixes: MixesFile) -> list[MixSpec]:
    """The calibration mix once on every link cap of the mixes it does not run on itself (none where there is
    no calibration mix or link_calibration is off), slowest cap first."""
    reference = mixes.calibration_mix
    if reference is None or not mixes.link_calibration:
        return []
    caps = sorted({m.link_mbit for m in mixes.mixes if m.link_mbit is not None} - {reference.link_mbit})
    return [reference.model_copy(update={"name": f"{reference.name}-link-{cap:g}m", "link_mbit": cap}) for cap in caps]


def fit_link(
    host: HostCalibration, spec: MixSpec, measured: MixMeasurement, mixes: MixesFile, model: ModelSpec
) -> HostCalibration:
    """`host` with the exchange latency on `spec`'s link cap: the calibration mix's arithmetic (fit_host) on
    its run over that cap, whose per-call costs are left as `host` has them."""
    assert spec.link_mbit is not None, "a link calibration mix runs on a capped link"
    on_link = fit_host(spec, measured, mixes, model, (host.attention_background_cores, host.ffn_background_cores))
    latencies = {**host.link_latency_us_by_mbit, spec.link_mbit: on_link.link_latency_us}
    source = f"{host.source}; link mix {spec.name}: {on_link.link_latency_us:.1f} us one way"
    return replace(host, link_latency_us_by_mbit=latencies, source=source)


def predict_row(
    spec: MixSpec, measured: MixMeasurement, mixes: MixesFile, model: ModelSpec, host: HostCalibration
) -> dict[str, Any]:
    """The result row of a measured mix with the planner's prediction for it."""
    prediction = predict_mix(spec, mixes, model, measured.view, host, measured.link_burst_bytes)
    row = mix_row(
        spec, measured.serve, prediction, measured.view, measured.busy, measured.ffn_busy_fraction, measured.throttled
    )
    row["measured"]["runs_tpot_ms"] = list(measured.runs_tpot_ms)
    row["measured"]["exchange"] = measured.exchange
    return row


# ---- the whole run ---------------------------------------------------------------------------------------
def best_of(rows: list[dict[str, Any]], side: str) -> str | None:
    """The mix with the most tok/s per accelerator, predicted (side 'predicted') or measured."""
    key = "tok_s_per_accelerator"
    scored = [(r[side].get(key) or 0.0, r["mix"]) for r in rows if r[side].get(key)]
    return max(scored)[1] if scored else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Errors over the mixes, and the planner's top-ranked mix against the best measured one."""
    errors = [abs(e) for r in rows if (e := r["error"]["decode_tok_s"]) is not None]
    top, best = best_of(rows, "predicted"), best_of(rows, "measured")
    by_name = {r["mix"]: r for r in rows}
    gap = None
    if top and best:
        gap = relative_error(
            by_name[top]["measured"]["tok_s_per_accelerator"], by_name[best]["measured"]["tok_s_per_accelerator"]
        )
    return {
        "mixes": len(rows),
        "max_abs_error_decode_tok_s": max(errors) if errors else None,
        "mean_abs_error_decode_tok_s": sum(errors) / len(errors) if errors else None,
        "within_15_percent": sum(e <= 0.15 for e in errors),
        "planner_top_mix": top,
        "best_measured_mix": best,
        "top_mix_measured_vs_best": gap,
    }


def _best_round(rounds: list[MixMeasurement]) -> MixMeasurement:
    """The round with the fastest timed run, carrying every round's runs' TPOTs (the spread over the rounds)."""
    best = min(rounds, key=lambda r: min(r.runs_tpot_ms, default=math.inf))
    return replace(best, runs_tpot_ms=tuple(t for r in rounds for t in r.runs_tpot_ms))


def run_mixes(
    mixes: MixesFile, launch: Launcher, show_progress: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Every mix in order, `mixes.rounds` times; the result document (rows in `mixes`, failures in
    `failed_mixes`)."""
    model_dir = Path(mixes.model) if mixes.model else builtin_model_dir()
    model = ModelSpec.from_pretrained(model_dir)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    reference = mixes.calibration_mix
    fanout = mixes.fanout_calibration_mix if reference is not None else None
    links = link_calibration_mixes(mixes)
    calibrations = [c for c in (reference, fanout, *links) if c is not None]
    recheck = reference if reference is not None and mixes.recheck_calibration else None
    measured: dict[str, list[MixMeasurement]] = {spec.name: [] for spec in (*calibrations, *mixes.mixes)}
    errors: dict[str, list[dict[str, Any]]] = {}  # mix -> the rounds it failed in, with the error
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), disable=not show_progress) as bar:
        total = mixes.rounds * (len(calibrations) + len(mixes.mixes)) + (recheck is not None)
        task = bar.add_task("mixes", total=total)

        def measure(spec: MixSpec, label: str) -> MixMeasurement:
            def phase(text: str) -> None:
                bar.update(task, description=f"{label}: {text}")

            try:
                return measure_mix(spec, mixes, model_dir, launch, phase)
            finally:
                bar.advance(task)

        for round_ in range(mixes.rounds):
            suffix = f" (round {round_ + 1}/{mixes.rounds})" if mixes.rounds > 1 else ""
            # a failed calibration fails the run: every prediction rests on it
            for spec in calibrations:
                measured[spec.name].append(measure(spec, f"calibration {spec.name}{suffix}"))
            for spec in mixes.mixes:
                try:
                    measured[spec.name].append(measure(spec, f"{spec.name}{suffix}"))
                except AfdError as error:
                    errors.setdefault(spec.name, []).append({"round": round_ + 1, "error": str(error)})
        again = None
        if recheck is not None:
            try:
                again = measure(recheck, f"calibration {recheck.name} again")
            except AfdError as error:
                failed.append({"mix": f"{recheck.name} (recheck)", "error": str(error)})
    best = {name: _best_round(rounds) for name, rounds in measured.items() if rounds}
    if mixes.pool_profiles:
        specs = {spec.name: spec for spec in (*calibrations, *mixes.mixes)}
        launches = [(specs[name], m) for name, rounds in measured.items() for m in rounds]
        launches += [(recheck, again)] if recheck is not None and again is not None else []
        pooled = pooled_profiles(launches)
        best = {name: with_pooled_profiles(specs[name], m, pooled) for name, m in best.items()}
        if recheck is not None and again is not None:
            again = with_pooled_profiles(recheck, again, pooled)

    host = file_host_calibration(mixes)
    calibration: dict[str, Any] | None = None
    drift = None
    if reference is not None:
        background = (0.0, 0.0)
        if mixes.fit_background:
            background = fit_background_cores([best[s.name] for s in (reference, *links)])
        host = fit_host(reference, best[reference.name], mixes, model, background)
        if fanout is not None:
            host = fit_fanout(host, fanout, best[fanout.name], mixes, model)
        for link_spec in links:
            host = fit_link(host, link_spec, best[link_spec.name], mixes, model)
        calibration = {
            "fitted": host.to_dict(),
            "run": predict_row(reference, best[reference.name], mixes, model, host),
        }
        if fanout is not None:
            calibration["fanout_run"] = predict_row(fanout, best[fanout.name], mixes, model, host)
        if links:
            calibration["link_runs"] = [predict_row(s, best[s.name], mixes, model, host) for s in links]
        if recheck is not None and again is not None:
            calibration["recheck_run"] = predict_row(recheck, again, mixes, model, host)
            first = calibration["run"]["measured"]["decode_tok_s"]
            drift = relative_error(calibration["recheck_run"]["measured"]["decode_tok_s"], first)
    for spec in mixes.mixes:
        if spec.name in best:
            rows.append(predict_row(spec, best[spec.name], mixes, model, host))
            if spec.name in errors:  # kept from the rounds that ran; say which did not
                rows[-1]["failed_rounds"] = errors[spec.name]
        else:
            failed.append({"mix": spec.name, "error": errors[spec.name][-1]["error"]})
    return {
        "version": RESULT_VERSION,
        "date": date,
        "model": str(model_dir),
        "architecture": model.architecture,
        "host": {"cpu": client_cpu_model(), "cores": os.cpu_count()},
        "workload": mixes.workload.model_dump(),
        "calibration": calibration,
        "host_calibration": host.to_dict(),
        "mixes": rows,
        "failed_mixes": failed,
        "summary": {**summary(rows), "calibration_drift_decode_tok_s": drift},
    }


# ---- report ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * 100:+.{digits}f} %" if percent else f"{value:,.{digits}f}"


def _pool_label(pool: Mapping[str, Any]) -> str:
    cpu = pool["cpu_limit_cores"]
    return f"{pool['count']} x {cpu:g} cpu/{pool['threads']}t" if cpu else f"{pool['count']} x cpu/{pool['threads']}t"


def _spread(runs: list[float]) -> str:
    """The slowest timed run of a mix against its fastest: what this host's noise does to one mix."""
    return _fmt(max(runs) / min(runs) - 1.0, percent=True, digits=0) if len(runs) > 1 and min(runs) > 0 else "-"


def table_rows(result: Mapping[str, Any]) -> list[list[str]]:
    """The report's table: one row per mix."""
    rows = []
    for r in result["mixes"]:
        p, m, e = r["predicted"], r["measured"], r["error"]
        busy = r["measured"]["busy"]
        rows.append(
            [
                r["mix"],
                _pool_label(r["attention"]),
                _pool_label(r["ffn"]),
                str(r["microbatches"]),
                r.get("wire_dtype", "auto"),
                f"{r['link_mbit']:g}" if r["link_mbit"] else "-",
                str(r["batch_per_attention_node"]),
                _fmt(p["decode_tok_s"]),
                _fmt(m["decode_tok_s"]),
                _fmt(e["decode_tok_s"], percent=True),
                _fmt(m["output_throughput"]),
                _fmt(p["tpot_ms"], 2),
                _fmt(m["tpot_ms"], 2),
                _spread(m.get("runs_tpot_ms") or []),
                _fmt(m["ttft_ms"], 0),
                " / ".join(_fmt(busy.get(role, {}).get("mean_cores"), 2) for role in ROLES),
                _exchange_label(m.get("exchange")),
                p["exposed"],
            ]
        )
    return rows


def _exchange_label(exchange: Mapping[str, Any] | None) -> str:
    """`wait / round trip ms (hidden %)` of the measured exchanges, "-" where none was read."""
    if not exchange or exchange.get("round_trip_ms") is None:
        return "-"
    hidden = exchange.get("hidden_share")
    share = f" ({hidden:.0%} hidden)" if hidden is not None else ""
    return f"{_fmt(exchange['wait_ms'], 2)} / {_fmt(exchange['round_trip_ms'], 2)}{share}"


HEADERS = [
    "mix", "attention", "FFN", "m", "wire", "link Mbit/s", "batch/attn", "pred tok/s", "meas tok/s", "error",
    "vLLM output tok/s", "pred TPOT ms", "meas TPOT ms", "runs' TPOT spread", "TTFT ms", "busy cores A / F",
    "wait / round trip ms per exchange", "predicted exposed",
]  # fmt: skip


def write_plots(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """measured_vs_predicted.png and pareto.png under `directory` (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise AfdError('--plot needs matplotlib: pip install "afd[plot]"') from exc
    rows = [r for r in result["mixes"] if r["measured"]["decode_tok_s"]]
    directory.mkdir(parents=True, exist_ok=True)
    names = [r["mix"] for r in rows]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    x = range(len(rows))
    axes.bar([i - 0.2 for i in x], [r["predicted"]["decode_tok_s"] for r in rows], 0.4, label="predicted")
    axes.bar([i + 0.2 for i in x], [r["measured"]["decode_tok_s"] for r in rows], 0.4, label="measured")
    axes.set_xticks(list(x), names, rotation=30, ha="right")
    axes.set_ylabel("decode tok/s")
    axes.set_title("afd bench mix: planner prediction vs measurement")
    axes.legend()
    figure.tight_layout()
    bars = directory / "measured_vs_predicted.png"
    figure.savefig(bars, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 5))
    for side, marker in (("measured", "o"), ("predicted", "x")):
        points = [(r[side]["tpot_ms"], r[side]["tok_s_per_accelerator"], r["mix"]) for r in rows]
        axes.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=side)
        if side == "measured":
            for tpot, rate, name in points:
                axes.annotate(name, (tpot, rate), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front: list[tuple[float, float]] = []
            for tpot, rate, _ in sorted(points):  # lowest TPOT first: on the front if nothing faster does more
                if not front or rate > front[-1][1]:
                    front.append((tpot, rate))
            axes.plot([f[0] for f in front], [f[1] for f in front], color="black", linewidth=1, label="measured front")
    axes.set_xlabel("TPOT (ms)")
    axes.set_ylabel("decode tok/s per accelerator (node)")
    axes.set_title("Pareto front: throughput per node against TPOT")
    axes.legend()
    figure.tight_layout()
    pareto = directory / "pareto.png"
    figure.savefig(pareto, dpi=120)
    plt.close(figure)
    return [bars, pareto]


def _capped_latencies(host: Mapping[str, Any]) -> str:
    fitted = host.get("link_latency_us_by_mbit") or {}
    return "".join(f", {us:.1f} us on the {cap} Mbit/s cap" for cap, us in fitted.items())


def markdown_report(result: Mapping[str, Any], plots: list[Path], report_path: Path) -> str:
    """The report: setup, the table, the summary, the failures, the plots (paths relative to the report)."""
    s = result["summary"]
    w = result["workload"]
    h = result["host_calibration"]
    lines = [
        "# afd bench mix",
        "",
        f"{result['date']} on {result['host']['cpu']} ({result['host']['cores']} cores), model "
        f"{result['architecture']} ({result['model']}). Every mix serves {w['requests_per_slot']} requests per "
        f"batch slot of {w['input_len']} "
        f"prompt and {w['output_len']} output tokens after a warm-up. Host calibration used by every "
        f"prediction: attention {h['attention_call_us']:.1f} us and FFN {h['ffn_call_us']:.1f} us per layer "
        f"call beyond the kernels, the FFN kernels at {h.get('ffn_kernel_scale', 1.0):.2f}x their start-up timing, "
        f"link latency {h['link_latency_us']:.1f} us one way{_capped_latencies(h)} "
        f"({h['source']}).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(row) + " |" for row in table_rows(result)),
        "",
        f"Error = (predicted - measured) / measured decode tok/s (concurrency / mean TPOT). Within 15 %: "
        f"{s['within_15_percent']} of {s['mixes']}; mean |error| "
        f"{_fmt(s['mean_abs_error_decode_tok_s'], percent=True)}, "
        f"max {_fmt(s['max_abs_error_decode_tok_s'], percent=True)}. The planner's top mix (tok/s per node) is "
        f"{s['planner_top_mix']}, the best measured {s['best_measured_mix']}; the top mix measured "
        f"{_fmt(s['top_mix_measured_vs_best'], percent=True)} against the best.",
    ]
    if (drift_line := _drift_line(s)) is not None:
        lines += ["", drift_line]
    partial = [(r["mix"], f) for r in result["mixes"] for f in r.get("failed_rounds", [])]
    if partial:
        lines += ["", "Rounds that failed (the mix kept its other rounds):"]
        lines += [f"- {name}, round {f['round']}: {f['error']}" for name, f in partial]
    if result["failed_mixes"]:
        lines += ["", "Failed mixes:", *(f"- {f['mix']}: {f['error']}" for f in result["failed_mixes"])]
    for plot in plots:
        try:
            relative = os.path.relpath(plot, report_path.parent)
        except ValueError:
            relative = str(plot)
        lines += ["", f"![{plot.stem}]({relative})"]
    return "\n".join(lines) + "\n"


def _drift_line(summary: Mapping[str, Any]) -> str | None:
    drift = summary.get("calibration_drift_decode_tok_s")
    if drift is None:
        return None
    return (
        f"The calibration mix, run again after the mixes, measured {_fmt(drift, percent=True)} decode tok/s "
        "against the run the fit rests on: this host's drift over the run, which errors of that size cannot be "
        "told from."
    )


def print_table(console: Console, result: Mapping[str, Any]) -> None:
    table = Table(title="afd bench mix")
    for header in HEADERS:
        table.add_column(
            header, justify="left" if header in ("mix", "attention", "FFN", "predicted exposed") else "right"
        )
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    if (drift_line := _drift_line(result["summary"])) is not None:
        console.print(drift_line)
    for failure in result["failed_mixes"]:
        console.print(f"[red]mix {failure['mix']} failed:[/red] {failure['error']}")


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM ends the run through `finally` blocks (each mix's teardown), as Ctrl-C does."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def make_command(launch: Launcher) -> Callable[..., None]:
    """The `afd bench mix` typer command, bringing mixes up with `launch` (the CLI passes the testbed's)."""

    def command(
        mixes: Annotated[Path, typer.Option(help="Mixes file (YAML): pools, CPU limits, A:F, m, link caps.")],
        out: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
        report: Annotated[Path | None, typer.Option(help="Write a markdown report here.")] = None,
        plot: Annotated[
            Path | None, typer.Option(help="Directory for measured_vs_predicted.png and pareto.png.")
        ] = None,
        json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line.")] = False,
    ) -> None:
        """Run each mix for real on this machine (CPU quotas, namespaces, capped links): measured vs predicted."""
        console = Console(stderr=json_output, width=None if sys.stdout.isatty() else 220)
        try:
            spec = load_mixes(mixes)
            with _terminate_as_exit():
                result = run_mixes(spec, launch, show_progress=sys.stderr.isatty(), console=Console(stderr=True))
            plots = write_plots(result, plot) if plot is not None and result["mixes"] else []
        except AfdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2 if isinstance(error, ConfigError) else 1) from None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            console.print(f"result written to {out}")
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(markdown_report(result, plots, report))
            console.print(f"report written to {report}")
        print_table(console, result)
        if json_output:
            typer.echo(json.dumps(result))
        if not result["mixes"]:
            raise typer.Exit(1)

    return command
