"""The cost model of a hardware mix: what one AFD deployment decodes per second, per accelerator and per dollar.

API (what `afd plan` and `afd bench mix` call)::

    from afd.planning import Mix, predict
    p = predict(spec, Mix(attention_kind="h20", attention_count=2, ffn_kind="l40s", ffn_count=4,
                          microbatches=2, batch_per_attention_node=64, context_len=4096, link="400gbe"))
    p.decode_tok_s, p.tok_s_per_accelerator, p.tokens_per_usd, p.usd_per_mtok, p.tpot_ms,
    p.kv_capacity_tokens, p.exposed            # "attention-bound" | "ffn-bound" | "link-bound"

`spec` is an afd.model_spec.ModelSpec (or the ModelCosts made from it). A Mix names the attention kind and
count, the FFN kind and count (catalog kinds), the microbatches m, the batch per attention node, the context,
the link (a catalog/calibration name or a `Link`), and optionally what was measured: `calibration` (per kind,
e.g. from a router's cluster view), `attention_measured` / `ffn_measured` (per role, overriding the kind's: two
pools of one kind with different CPU limits), `prices_usd_per_hour`, and `overlap=False` for pools that share
the hardware they compute on. `CostModel(spec, catalog, calibration)` is the same with the per-kind fits kept
between calls (the planner evaluates thousands of mixes).

The model, per layer and per microbatch of t = b / m tokens (microseconds):
- attention  T_a(t, ctx) = k1(ctx) * t + k2,  k1 = a * (ctx * kv_bytes / BW + flops(ctx) / F),  k2 = c * W_a / BW;
- FFN node   T_f(x) = k3 * x + k4 (x = routed (token, expert) pairs the node gets from all attention nodes;
  below one pair per held expert only x experts are read: k4 * min(1, x / E_node)),  k3 = a_f * 2P/F,
  k4 = c_f * E_node * P * bytes / BW; dense and shared MLPs are split across the FFN nodes (every node sees
  every token);
- link       T_c = bytes there and back / bandwidth + 2 * one-way latency (the busier end: the attention
  node's NIC, or an FFN node's, which hears every attention node);
- a layer takes max(m * T_a, m * T_f, m * link occupancy, T_a + T_c + T_f): the pools work on different
  microbatches at once (ping-pong), but one microbatch's round trip cannot be shorter than its parts. With
  `overlap=False` (both pools compute on the same cores) their compute adds up, m * (T_a + T_f), while the
  link, which takes no compute, still carries one microbatch while the cores work on another: a layer takes
  max(m * (T_a + T_f), m * link occupancy, T_a + T_c + T_f). Where the shared hardware has more than one
  core for the nodes (`shared_cores`), they compute at the same time as far as it goes: m * (T_a + T_f) becomes
  max(m * T_a, m * T_f, m * (n_a * T_a + n_f * T_f) / shared_cores), each term times the node's threads.
  TPOT = the layers + the LM head.
  Measured per-call costs beyond the kernels (`attention_call_us`, `ffn_call_us`: framework, codec, RPC) add
  to T_a and T_f. A CPU node under a CFS quota (`attention_quota` / `ffn_quota`: q cores, t threads) cannot
  take less than its compute per step x t / q: the step is the larger of the two.
(a, c) are the efficiencies fitted to measurements: one measurement scales both terms (a = c = measured /
roofline), two or more at different batches fit each by least squares. A kind nobody measured takes the
efficiencies of the measured kinds of its class (gpu, npu, cpu): the datasheet then only scales a measured
kind to another (bandwidth ratio for the bytes terms, FLOP ratio for the FLOP terms). With nothing measured
the roofline stands (efficiency 1, an upper bound), and `Prediction.basis` says so.

MegaScale-Infer's microbatch rule (m >= 2 (1 + T_c / T_f)) and FastAFD's (FFN hidden behind attention,
T_f <= T_a) are reported for every prediction (`megascale_microbatches`, `ffn_hidden`); the planner treats both
as candidates and says which one its choice follows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.planning.calibration import (
    AttentionMeasurement,
    Calibration,
    FfnMeasurement,
    KindCalibration,
)
from afd.planning.catalog import Catalog, HardwareKind, load_catalog
from afd.planning.model_costs import ModelCosts, model_costs

Exposed = Literal["attention-bound", "ffn-bound", "link-bound"]
Dtype = Literal["bf16", "fp8"]


@dataclass(frozen=True, slots=True)
class Link:
    """An A↔F link as the cost model uses it."""

    name: str
    """Catalog or calibration name, or a label of the caller's."""
    bandwidth_bytes_per_s: float
    """Per direction, per node, bytes/s."""
    latency_us: float
    """One-way latency of one exchange, microseconds."""
    source: str = ""
    """Where the figures come from."""

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0 or self.latency_us < 0:
            raise ConfigError(f"link {self.name!r}: bandwidth must be > 0 and latency >= 0")


@dataclass(frozen=True, slots=True)
class CpuQuota:
    """A CPU node limited to `cores` of CPU time per scheduling period (a CFS quota, what a Kubernetes
    `resources.limits.cpu` sets), computing with `threads` threads."""

    cores: float
    """CPU time per period, in cores (0.5: half a core)."""
    threads: int = 1
    """Threads the node computes with; all of them are counted busy while it computes (torch's OpenMP
    threads spin), so its compute time per step costs threads x that much CPU time."""

    def __post_init__(self) -> None:
        if not self.cores > 0 or self.threads < 1:
            raise ConfigError(f"CpuQuota needs cores > 0 and threads >= 1, got {self.cores}, {self.threads}")


@dataclass(frozen=True, slots=True)
class Mix:
    """One deployment: which kind serves each role, how many, and how the attention nodes batch."""

    attention_kind: str
    """Catalog kind of the attention nodes."""
    attention_count: int
    """Attention nodes (one device each)."""
    ffn_kind: str
    """Catalog kind of the FFN nodes."""
    ffn_count: int
    """FFN nodes (one device each); the experts are spread over them."""
    microbatches: int
    """Ping-pong microbatches m per decode step."""
    batch_per_attention_node: int
    """Requests in one attention node's decode batch."""
    context_len: int = 4096
    """Tokens of context of each request (prompt + output so far)."""
    link: str | Link = "400gbe"
    """A↔F link: a catalog or calibration link name, or a Link."""
    calibration: Calibration | None = None
    """Measurements per kind (and measured links); None: the CostModel's own (none for `predict`)."""
    attention_measured: tuple[AttentionMeasurement, ...] = ()
    """Measurements of this mix's attention nodes; replace the kind's."""
    ffn_measured: tuple[FfnMeasurement, ...] = ()
    """Measurements of this mix's FFN nodes; replace the kind's."""
    prices_usd_per_hour: Mapping[str, float] = field(default_factory=dict)
    """Kind -> $ per device-hour, overriding the catalog's default."""
    dtype: Dtype = "bf16"
    """Weights and compute: bf16, or fp8 (1-byte weights, FP8 FLOP/s where the kind has them)."""
    memory_utilization: float = 0.9
    """Share of device memory for weights and KV (vLLM's gpu_memory_utilization default)."""
    activation_bytes: float = 2.0
    """Bytes per hidden-state element on the link (bf16 both ways)."""
    dispatch_activation_bytes: float | None = None
    """Bytes per hidden-state element from attention to FFN where the wire narrows that leg (fp8: 1 plus the
    per-token float32 scale spread over the hidden size); None: activation_bytes, as on the way back."""
    overlap: bool = True
    """False when both pools share the hardware they compute on (CPU processes on one host): their compute does
    not overlap (the link still overlaps it)."""
    shared_cores: float | None = None
    """With overlap=False: the cores the nodes of both pools share (a host's cores less what the router and the
    load generator take there). The nodes then compute at the same time as far as these cores go: a layer takes
    at least every node's compute of it (each attention node's m x T_a, each FFN node's m x T_f, times its
    threads) over these cores. None: the pools take turns, m (T_a + T_f)."""
    attention_quota: CpuQuota | None = None
    """CPU limit of each attention node (CPU pools under a CFS quota): a step cannot take less wall time than
    the node's CPU time per step over its quota. The measured costs are its unthrottled ones."""
    ffn_quota: CpuQuota | None = None
    """CPU limit of each FFN node, as attention_quota."""
    attention_call_us: float = 0.0
    """Measured cost of one layer's call on an attention node beyond its kernels (scheduling, the MoE gate's
    bookkeeping, frame encoding, the RPC), µs per layer and microbatch; added to T_a (k2)."""
    ffn_call_us: float = 0.0
    """The same on an FFN node (frame decoding, batching, the reply), µs per layer and microbatch; added to
    T_f (k4)."""
    ffn_kernel_scale: float = 1.0
    """Factor on the FFN node's expert and dense kernel terms (k3 and the weight reads) beyond what its fitted
    efficiency says: where a host's runs show that a layer's kernels cost a share of the per-expert start-up
    timings they were scaled from (benchmarks/mix.py fit_fanout); 0 leaves the FFN node its call cost alone."""
    attention_background_cores: float = 0.0
    """CPU an attention node takes all the time beside its compute (its server's and transport's own threads:
    polling, timers, heartbeats), cores: under a CPU quota it leaves the node's compute `cores` less this, and on
    shared cores it takes its share of them, however long the step (benchmarks/mix.py fit_background_cores)."""
    ffn_background_cores: float = 0.0
    """The same for each FFN node."""

    def __post_init__(self) -> None:
        for name in ("attention_count", "ffn_count", "microbatches", "batch_per_attention_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Mix.{name} must be >= 1, got {getattr(self, name)}")
        if self.context_len < 1:
            raise ConfigError(f"Mix.context_len must be >= 1, got {self.context_len}")
        if self.attention_call_us < 0 or self.ffn_call_us < 0:
            raise ConfigError("Mix.attention_call_us and Mix.ffn_call_us must be >= 0")
        if not self.ffn_kernel_scale >= 0:
            raise ConfigError(f"Mix.ffn_kernel_scale must be >= 0, got {self.ffn_kernel_scale}")
        if not (self.attention_background_cores >= 0 and self.ffn_background_cores >= 0):
            raise ConfigError("Mix.attention_background_cores and Mix.ffn_background_cores must be >= 0")
        if self.shared_cores is not None and not self.shared_cores > 0:
            raise ConfigError(f"Mix.shared_cores must be > 0 when set, got {self.shared_cores}")
        if not 0 < self.memory_utilization <= 1:
            raise ConfigError(f"Mix.memory_utilization must be in (0, 1], got {self.memory_utilization}")


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the cost model predicts for one Mix (one deployment of attention_count + ffn_count devices)."""

    mix: Mix
    """The mix predicted."""
    decode_tok_s: float
    """Output tokens per second of the whole deployment at the planned batch."""
    tok_s_per_accelerator: float
    """decode_tok_s / (attention_count + ffn_count)."""
    tokens_per_usd: float
    """Output tokens per dollar of device time."""
    usd_per_mtok: float
    """Dollars of device time per million output tokens."""
    cost_usd_per_hour: float
    """Price of the deployment's devices for one hour."""
    tpot_ms: float
    """Time per output token (one decode step), milliseconds."""
    kv_capacity_tokens: int
    """KV-cache tokens the attention pool holds (all attention nodes)."""
    max_batch_by_kv: int
    """Requests of context_len one attention node can hold."""
    exposed: Exposed
    """The side the step waits on."""
    attention_us: float
    """T_a: attention time of one microbatch, summed over the layers, µs (with the LM head)."""
    ffn_us: float
    """T_f: FFN time of one microbatch on one FFN node, summed over the layers, µs."""
    link_us: float
    """T_c: link time of one microbatch (there and back, with latency), summed over the layers, µs."""
    megascale_microbatches: int
    """MegaScale-Infer's m = ceil(2 (1 + T_c / T_f)) at this operating point."""
    ffn_hidden: bool
    """FastAFD's regime: T_f <= T_a (the FFN side hides behind attention)."""
    fits: bool
    """The weights fit the FFN pool and the batch's KV fits the attention nodes."""
    problems: tuple[str, ...]
    """Why it does not fit (empty when it does)."""
    basis: Mapping[str, str]
    """Role -> what its costs rest on (measured, scaled from a measured kind, or datasheet roofline)."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures (the mix as its kinds and sizes)."""
        mix = self.mix
        link = mix.link if isinstance(mix.link, str) else mix.link.name
        return {
            "attention": {"kind": mix.attention_kind, "count": mix.attention_count},
            "ffn": {"kind": mix.ffn_kind, "count": mix.ffn_count},
            "microbatches": mix.microbatches,
            "batch_per_attention_node": mix.batch_per_attention_node,
            "context_len": mix.context_len,
            "link": link,
            "decode_tok_s": round(self.decode_tok_s, 3),
            "tok_s_per_accelerator": round(self.tok_s_per_accelerator, 3),
            "tokens_per_usd": round(self.tokens_per_usd, 1),
            "usd_per_mtok": round(self.usd_per_mtok, 4),
            "cost_usd_per_hour": round(self.cost_usd_per_hour, 4),
            "tpot_ms": round(self.tpot_ms, 4),
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_batch_by_kv": self.max_batch_by_kv,
            "exposed": self.exposed,
            "attention_us": round(self.attention_us, 3),
            "ffn_us": round(self.ffn_us, 3),
            "link_us": round(self.link_us, 3),
            "megascale_microbatches": self.megascale_microbatches,
            "ffn_hidden": self.ffn_hidden,
            "fits": self.fits,
            "problems": list(self.problems),
            "basis": dict(self.basis),
        }


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fitted share of the roofline: measured time = variable * roofline variable + fixed * roofline fixed."""

    variable: float
    """Scale of the per-token terms (k1, k3)."""
    fixed: float
    """Scale of the per-call terms (k2, k4)."""
    basis: str
    """What it rests on."""


ROOFLINE = Efficiency(1.0, 1.0, "datasheet roofline (nothing measured: an upper bound)")


def fit_efficiency(points: list[tuple[float, float, float]], basis: str) -> Efficiency:
    """(variable roofline µs, fixed roofline µs, measured µs) points -> Efficiency.

    One point (or points that cannot tell the terms apart) scales both terms alike; two or more fit each term
    by least squares on relative errors. A negative fitted term falls back to the common scale.
    """
    if not points:
        return ROOFLINE
    common = sum(measured for _, _, measured in points) / sum(v + f for v, f, _ in points)
    rows = [(v / m, f / m) for v, f, m in points]  # relative errors: every point weighs the same
    svv = sum(v * v for v, _ in rows)
    sff = sum(f * f for _, f in rows)
    svf = sum(v * f for v, f in rows)
    sv = sum(v for v, _ in rows)
    sf = sum(f for _, f in rows)
    det = svv * sff - svf * svf
    if len(points) < 2 or det <= 1e-12 * max(svv * sff, 1e-300):
        return Efficiency(common, common, basis)
    variable = (sv * sff - sf * svf) / det
    fixed = (sf * svv - sv * svf) / det
    if variable <= 0 or fixed <= 0:
        return Efficiency(common, common, basis)
    return Efficiency(variable, fixed, basis)


class CostModel:
    """The per-kind fits of one model against one catalog and calibration; `predict` evaluates a Mix."""

    def __init__(
        self,
        model: ModelSpec | ModelCosts,
        catalog: Catalog | None = None,
        calibration: Calibration | None = None,
        dtype: Dtype = "bf16",
    ) -> None:
        self.catalog = catalog if catalog is not None else load_catalog()
        self.calibration = calibration if calibration is not None else Calibration()
        self.dtype = dtype
        weight_bytes = 1.0 if dtype == "fp8" else 2.0
        self.costs = model if isinstance(model, ModelCosts) else model_costs(model, weight_bytes=weight_bytes)
        self._fits: dict[tuple[str, str], Efficiency] = {}

    # ---- rooflines (µs) of one layer class, the terms the efficiencies scale ----------------------------
    def _attention_roofline(self, kind: HardwareKind, tokens: float, ctx: int) -> tuple[float, float]:
        """(variable, fixed) µs of the attention half of one average layer for `tokens` tokens at `ctx`."""
        bw, flops = kind.memory_bandwidth_bytes_per_s, kind.flops_per_s(self.dtype)
        variable = fixed = 0.0
        for c in self.costs.layers:
            per_token = (ctx * c.kv_bytes_per_token + c.state_bytes_per_request) / bw
            per_token += (c.attention_flops_per_token + ctx * c.attention_flops_per_token_ctx) / flops
            variable += c.count * tokens * per_token
            fixed += c.count * c.attention_params * self.costs.weight_bytes / bw
        layers = self.costs.num_layers
        return variable / layers * 1e6, fixed / layers * 1e6

    def _ffn_calibration_roofline(self, kind: HardwareKind, tokens: int) -> tuple[float, float]:
        """(variable, fixed) µs of what an FFN node times at start-up: `tokens` tokens through one expert."""
        params = self.costs.calibration_expert_params
        variable = tokens * 2.0 * params / kind.flops_per_s(self.dtype)
        fixed = params * self.costs.weight_bytes / kind.memory_bandwidth_bytes_per_s
        return variable * 1e6, fixed * 1e6

    # ---- fits ------------------------------------------------------------------------------------------
    def _measured(self, kind_name: str, role: str, mix: Mix | None) -> Efficiency | None:
        kind = self.catalog.kind(kind_name)
        if role == "attention":
            att = mix.attention_measured if mix is not None and mix.attention_measured else ()
            label = "measured on this mix's attention nodes" if att else f"measured on {kind_name}"
            if not att:
                att = self.calibration.kinds.get(kind_name, _EMPTY).attention
            points = [(*self._attention_roofline(kind, p.batch, p.context_len), p.us_per_token * p.batch) for p in att]
        else:
            ffn = mix.ffn_measured if mix is not None and mix.ffn_measured else ()
            label = "measured on this mix's FFN nodes" if ffn else f"measured on {kind_name}"
            if not ffn:
                ffn = self.calibration.kinds.get(kind_name, _EMPTY).ffn
            points = [(*self._ffn_calibration_roofline(kind, p.tokens), p.us_per_token_expert * p.tokens) for p in ffn]
        return fit_efficiency(points, label) if points else None

    def efficiency(self, kind_name: str, role: str, mix: Mix | None = None) -> Efficiency:
        """The fitted efficiency of `role` on `kind_name`: measured, carried over from the measured kinds of
        its device class, or the roofline."""
        measured = self._measured(kind_name, role, mix)
        if measured is not None:
            return measured
        key = (kind_name, role)
        if key not in self._fits:
            device_class = self.catalog.kind(kind_name).device_class
            peers = [
                (name, fit)
                for name in sorted(self.calibration.kinds)
                if name in self.catalog.kinds
                and self.catalog.kinds[name].device_class == device_class
                and (fit := self._measured(name, role, None)) is not None
            ]
            if not peers:
                self._fits[key] = ROOFLINE
            else:
                variable = math.exp(sum(math.log(f.variable) for _, f in peers) / len(peers))
                fixed = math.exp(sum(math.log(f.fixed) for _, f in peers) / len(peers))
                names = ", ".join(name for name, _ in peers)
                self._fits[key] = Efficiency(
                    variable, fixed, f"scaled from {names} (measured) by bandwidth and FLOP ratios"
                )
        return self._fits[key]

    def link(self, link: str | Link) -> Link:
        if isinstance(link, Link):
            return link
        measured = self.calibration.links.get(link.lower())
        if measured is not None:
            return Link(link, measured.bandwidth_gb_per_s * 1e9, measured.latency_us, measured.source)
        entry = self.catalog.link(link)
        return Link(
            link,
            entry.bandwidth_gb_per_s.value * 1e9,
            entry.latency_us.value,
            f"{entry.bandwidth_gb_per_s.source}; {entry.latency_us.source}",
        )

    def price(self, kind: str, mix: Mix) -> float:
        override = mix.prices_usd_per_hour.get(kind)
        return override if override is not None else self.catalog.kind(kind).price_usd_per_hour.value

    # ---- capacity ----------------------------------------------------------------------------------------
    def max_batch_by_kv(self, kind_name: str, context_len: int, memory_utilization: float = 0.9) -> int:
        """Requests of `context_len` tokens one attention node of `kind_name` holds (0: not even one)."""
        kind = self.catalog.kind(kind_name)
        free = kind.memory_bytes * memory_utilization - self.costs.attention_weight_bytes
        per_request = context_len * self.costs.kv_bytes_per_token + self.costs.state_bytes_per_request
        if free <= 0:
            return 0
        return int(free // per_request) if per_request > 0 else 1 << 30

    def ffn_memory_problem(self, kind_name: str, count: int, memory_utilization: float = 0.9) -> str | None:
        """Why `count` FFN nodes of `kind_name` cannot hold the FFN weights, or None when they can."""
        kind = self.catalog.kind(kind_name)
        need = self.costs.ffn_weight_bytes / count
        have = kind.memory_bytes * memory_utilization
        if need <= have:
            return None
        return (
            f"the FFN weights ({self.costs.ffn_weight_bytes / 1e9:.1f} GB) need {need / 1e9:.1f} GB on each of "
            f"{count} {kind_name} FFN nodes, which hold {have / 1e9:.1f} GB each "
            f"({memory_utilization:.0%} of {kind.memory_gb.value:g} GB)"
        )

    # ---- the prediction ------------------------------------------------------------------------------------
    def predict(self, mix: Mix) -> Prediction:
        if mix.calibration is not None and mix.calibration is not self.calibration:
            # the mix brings its own measurements: fit them, not this model's
            return CostModel(self.costs, self.catalog, mix.calibration, self.dtype).predict(mix)
        attention_kind = self.catalog.kind(mix.attention_kind)
        ffn_kind = self.catalog.kind(mix.ffn_kind)
        if mix.dtype != self.dtype:
            raise ConfigError(f"Mix.dtype {mix.dtype!r} differs from the cost model's {self.dtype!r}")
        eff_a = self.efficiency(mix.attention_kind, "attention", mix)
        eff_f = self.efficiency(mix.ffn_kind, "ffn", mix)
        link = self.link(mix.link)
        costs = self.costs
        m, n_a, n_f, b, ctx = (
            mix.microbatches,
            mix.attention_count,
            mix.ffn_count,
            mix.batch_per_attention_node,
            mix.context_len,
        )
        t_mb = b / m
        bw_a, fl_a = attention_kind.memory_bandwidth_bytes_per_s, attention_kind.flops_per_s(self.dtype)
        bw_f, fl_f = ffn_kind.memory_bandwidth_bytes_per_s, ffn_kind.flops_per_s(self.dtype)
        wb = costs.weight_bytes
        threads_a = mix.attention_quota.threads if mix.attention_quota else 1
        threads_f = mix.ffn_quota.threads if mix.ffn_quota else 1
        problems: list[str] = []
        compute_cores = 0.0
        if mix.shared_cores is not None:
            # what the nodes' background threads leave of the shared cores for their compute
            background = n_a * mix.attention_background_cores + n_f * mix.ffn_background_cores
            compute_cores = _cores_left(mix.shared_cores, background, "the shared cores", problems)
        step_us = 0.0
        bound_us = {"attention-bound": 0.0, "ffn-bound": 0.0, "link-bound": 0.0}
        sum_a = sum_f = sum_c = 0.0
        for c in costs.layers:
            per_token = (ctx * c.kv_bytes_per_token + c.state_bytes_per_request) / bw_a
            per_token += (c.attention_flops_per_token + ctx * c.attention_flops_per_token_ctx) / fl_a
            t_a = (eff_a.variable * t_mb * per_token + eff_a.fixed * c.attention_params * wb / bw_a) * 1e6
            t_a += mix.attention_call_us
            t_f = 0.0
            if c.num_experts:
                pairs = n_a * t_mb * c.top_k / n_f
                held = c.num_experts / n_f
                t_f += eff_f.variable * pairs * 2.0 * c.expert_params / fl_f
                t_f += eff_f.fixed * held * c.expert_params * wb / bw_f * min(1.0, pairs / held)
            if c.shared_params:
                t_f += eff_f.variable * n_a * t_mb * 2.0 * c.shared_params / n_f / fl_f
                t_f += eff_f.fixed * c.shared_params / n_f * wb / bw_f
            t_f = t_f * mix.ffn_kernel_scale * 1e6 + mix.ffn_call_us
            # distinct FFN nodes a token goes to: all of them where a dense/shared slice lives on each
            fanout = n_f if c.shared_params else n_f * (1.0 - (1.0 - 1.0 / n_f) ** c.top_k)
            # Each leg is paced by the busier end of it: the attention node sends (and receives) its tokens'
            # states, an FFN node receives (and sends) n_a / n_f times as many; the links are full duplex.
            dispatch_bytes = mix.dispatch_activation_bytes or mix.activation_bytes
            legs_us = [
                max(1.0, n_a / n_f) * t_mb * fanout * costs.hidden_size * element / link.bandwidth_bytes_per_s * 1e6
                for element in (dispatch_bytes, mix.activation_bytes)
            ]
            one_way_us = max(legs_us)
            t_c = sum(legs_us) + 2 * link.latency_us
            if mix.overlap:
                terms = {"attention-bound": m * t_a, "ffn-bound": m * t_f, "link-bound": m * one_way_us}
                cycle = t_a + t_c + t_f
                layer = max(*terms.values(), cycle)
                if max(terms.values()) >= cycle:
                    side = max(terms, key=lambda k: terms[k])
                else:  # the pipeline is not full: the longest part of one microbatch's round trip shows
                    parts = {"attention-bound": t_a, "ffn-bound": t_f, "link-bound": t_c}
                    side = max(parts, key=lambda k: parts[k])
            else:
                if mix.shared_cores is None:
                    compute = m * (t_a + t_f)
                    heavier_attention = t_a >= t_f
                else:
                    cpu_a, cpu_f = n_a * t_a * threads_a, n_f * t_f * threads_f
                    compute = max(m * t_a, m * t_f, m * (cpu_a + cpu_f) / compute_cores)
                    heavier_attention = cpu_a >= cpu_f
                occupancy, cycle = m * one_way_us, t_a + t_c + t_f
                layer = max(compute, occupancy, cycle)
                if occupancy >= max(compute, cycle):
                    side = "link-bound"
                elif compute >= cycle:  # the shared cores are full: the pool that uses them more shows
                    side = "attention-bound" if heavier_attention else "ffn-bound"
                else:
                    parts = {"attention-bound": t_a, "ffn-bound": t_f, "link-bound": t_c}
                    side = max(parts, key=lambda k: parts[k])
            step_us += c.count * layer
            bound_us[side] += c.count * layer
            sum_a += c.count * t_a
            sum_f += c.count * t_f
            sum_c += c.count * t_c
        head = costs.head_params
        head_us = (eff_a.variable * b * 2.0 * head / fl_a + eff_a.fixed * head * wb / bw_a) * 1e6
        step_us += head_us
        bound_us["attention-bound"] += head_us
        sum_a += head_us / m

        # A node under a CPU quota runs its m microbatches' compute of a step (threads x as much CPU time) at
        # no more than `cores`: below that the chain above stands, above it the quota is what the step waits on.
        # Its background threads take their share of the quota all the time, computing or waiting.
        for side, quota, busy_us, background, node in (
            ("attention-bound", mix.attention_quota, m * sum_a, mix.attention_background_cores, "an attention"),
            ("ffn-bound", mix.ffn_quota, m * sum_f, mix.ffn_background_cores, "an FFN"),
        ):
            if quota is None:
                continue
            cores = _cores_left(quota.cores, background, f"{node} node's CPU quota", problems)
            if busy_us * quota.threads / cores > step_us:
                step_us = busy_us * quota.threads / cores
                bound_us = {"attention-bound": 0.0, "ffn-bound": 0.0, "link-bound": 0.0, side: step_us}
        tpot_ms = step_us / 1e3
        tok_s = n_a * b / (step_us / 1e6)
        cost = n_a * self.price(mix.attention_kind, mix) + n_f * self.price(mix.ffn_kind, mix)
        per_node_kv = self.max_batch_by_kv(mix.attention_kind, ctx, mix.memory_utilization)
        free = attention_kind.memory_bytes * mix.memory_utilization - costs.attention_weight_bytes
        kv_tokens_node = max(0, int(free // costs.kv_bytes_per_token)) if costs.kv_bytes_per_token else 0
        ffn_problem = self.ffn_memory_problem(mix.ffn_kind, n_f, mix.memory_utilization)
        if ffn_problem:
            problems.append(ffn_problem)
        if per_node_kv < b:
            problems.append(
                f"{b} requests of {ctx} tokens need {b * ctx * costs.kv_bytes_per_token / 1e9:.2f} GB of KV on each "
                f"{mix.attention_kind} attention node, which holds {per_node_kv} such requests"
            )
        megascale = math.ceil(2 * (1 + sum_c / sum_f)) if sum_f > 0 else 1
        return Prediction(
            mix=mix,
            decode_tok_s=tok_s,
            tok_s_per_accelerator=tok_s / (n_a + n_f),
            tokens_per_usd=tok_s * 3600 / cost if cost > 0 else math.inf,
            usd_per_mtok=cost / (tok_s * 3600) * 1e6,
            cost_usd_per_hour=cost,
            tpot_ms=tpot_ms,
            kv_capacity_tokens=n_a * kv_tokens_node,
            max_batch_by_kv=per_node_kv,
            exposed=max(bound_us, key=lambda k: bound_us[k]),  # type: ignore[arg-type]
            attention_us=sum_a,
            ffn_us=sum_f,
            link_us=sum_c,
            megascale_microbatches=megascale,
            ffn_hidden=sum_f <= sum_a,
            fits=not problems,
            problems=tuple(problems),
            basis={
                "attention": eff_a.basis + _quota_note(mix.attention_quota),
                "ffn": eff_f.basis + _quota_note(mix.ffn_quota),
                "link": link.source or link.name,
            },
        )


_EMPTY = KindCalibration()


MIN_COMPUTE_SHARE = 0.1
"""Least share of a node's cores left to its compute when its background threads would take more: the mix is
predicted at that share and flagged as not fitting."""


def _cores_left(cores: float, background: float, what: str, problems: list[str]) -> float:
    """`cores` less `background` (cores), at least MIN_COMPUTE_SHARE of `cores`; a problem noted when it clamps."""
    left = cores - background
    if left < MIN_COMPUTE_SHARE * cores:
        problems.append(
            f"background threads take {background:.2f} of the {cores:g} cores of {what}: "
            f"predicted at {MIN_COMPUTE_SHARE:.0%} of them left to compute"
        )
        return MIN_COMPUTE_SHARE * cores
    return left


def _quota_note(quota: CpuQuota | None) -> str:
    return f"; under a CPU quota of {quota.cores:g} cores, {quota.threads} threads" if quota else ""


def predict(model: ModelSpec | ModelCosts, mix: Mix, catalog: Catalog | None = None) -> Prediction:
    """Predicted decode figures of `mix` serving `model` (see the module docstring)."""
    return CostModel(model, catalog, mix.calibration, mix.dtype).predict(mix)
