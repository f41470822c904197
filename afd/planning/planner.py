"""`afd plan`'s search: every deployment an inventory allows, predicted by the cost model and ranked.

A candidate is one AFD deployment: an attention kind and count, an FFN kind and count (the same kind may serve
both roles, splitting its devices), a number of microbatches m and the batch per attention node. For each
(kinds, counts, m) the planner takes the largest batch whose TPOT stays within the SLO and whose KV fits (the
step time grows with the batch, so bisection finds it), then ranks by the objective. m runs over 1..4, which
holds both microbatch rules the literature gives: MegaScale-Infer's m >= 2 (1 + T_c / T_f) and FastAFD's
advice to keep the FFN side hidden behind attention (T_f <= T_a, reached through the A:F ratio). Neither is
imposed: `Plan.rules` says which the winner follows, and what the best candidate under each rule predicts.

An inventory that cannot serve the model at all (the experts fit on no FFN pool it has, or one request's KV at
the context fits on no attention kind) is refused with PlanningError naming the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from afd.errors import ConfigError
from afd.planning.cost_model import CostModel, Link, Mix, Prediction

Objective = Literal["per-dollar", "per-accelerator", "throughput"]
OBJECTIVES: tuple[Objective, ...] = ("per-dollar", "per-accelerator", "throughput")
MAX_MICROBATCHES = 4
"""Largest m tried (MegaScale-Infer runs 2-4 in practice; router/microbatch_plan.py caps at 4 too)."""
MAX_BATCH = 1024
"""Largest batch per attention node tried (requests in one decode step)."""


class PlanningError(ConfigError):
    """The inventory cannot serve the model (or the input to the planner is malformed)."""


def parse_inventory(text: str) -> dict[str, int]:
    """ "h20:16,l40s:32" -> {"h20": 16, "l40s": 32}; PlanningError naming the bad item."""
    inventory: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, sep, count = item.partition(":")
        try:
            number = int(count) if sep else -1
        except ValueError:
            number = -1
        if not kind or number < 1:
            raise PlanningError(f"--hardware item {item!r}: expected KIND:COUNT with COUNT >= 1, e.g. h20:16")
        inventory[kind.strip().lower()] = inventory.get(kind.strip().lower(), 0) + number
    if not inventory:
        raise PlanningError("--hardware is empty: give KIND:COUNT[,KIND:COUNT...], e.g. h20:16,l40s:32")
    return inventory


def parse_prices(text: str | None) -> dict[str, float]:
    """ "h20=1.2,l40s=0.9" -> {"h20": 1.2, "l40s": 0.9}."""
    prices: dict[str, float] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        kind, sep, value = item.partition("=")
        try:
            price = float(value) if sep else -1.0
        except ValueError:
            price = -1.0
        if not kind or price < 0:
            raise PlanningError(f"--price item {item!r}: expected KIND=USD_PER_HOUR, e.g. h20=1.2")
        prices[kind.strip().lower()] = price
    return prices


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked deployment."""

    prediction: Prediction
    """The cost model's figures for it."""
    replicas: int
    """Copies of this deployment the inventory holds."""

    @property
    def inventory_tok_s(self) -> float:
        """Decode tokens/s of all replicas."""
        return self.replicas * self.prediction.decode_tok_s

    def to_dict(self) -> dict[str, object]:
        return {
            **self.prediction.to_dict(),
            "replicas": self.replicas,
            "inventory_tok_s": round(self.inventory_tok_s, 3),
        }


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What `afd plan` was asked."""

    inventory: Mapping[str, int]
    """Kind -> devices available."""
    slo_tpot_ms: float
    """Largest acceptable time per output token, ms."""
    context_len: int = 4096
    """Context per request the KV must hold and attention must read, tokens."""
    link: str | Link = "400gbe"
    """A↔F link."""
    prices_usd_per_hour: Mapping[str, float] = field(default_factory=dict)
    """Price overrides."""
    objective: Objective = "per-dollar"
    """What the ranking maximises: tokens per dollar, tokens/s per accelerator, or tokens/s of the inventory."""
    max_microbatches: int = MAX_MICROBATCHES
    """Largest m tried."""
    max_batch: int = MAX_BATCH
    """Largest batch per attention node tried."""
    memory_utilization: float = 0.9
    """Share of each device's memory for weights and KV."""

    def __post_init__(self) -> None:
        if self.slo_tpot_ms <= 0:
            raise PlanningError(f"--slo-tpot-ms must be > 0, got {self.slo_tpot_ms}")
        if self.context_len < 1:
            raise PlanningError(f"--context must be >= 1, got {self.context_len}")
        if self.objective not in OBJECTIVES:
            raise PlanningError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")


@dataclass(frozen=True, slots=True)
class Plan:
    """Ranked candidates (best first) and which microbatch rule the best follows."""

    request: PlanRequest
    """What was asked."""
    candidates: tuple[Candidate, ...]
    """Every feasible candidate, best first."""
    rules: Mapping[str, object]
    """The chosen regime and why; the best candidate under each rule."""
    sweep: tuple[Prediction, ...] = ()
    """With plan(..., sweep=True): every candidate also at the powers of two below its batch (the TPOT /
    throughput trade-off a Pareto plot shows)."""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]


def _count_options(available: int) -> list[int]:
    """Node counts tried for a pool of `available` devices: every count up to 16, then a coarse ladder."""
    options = set(range(1, min(available, 16) + 1))
    step = 1
    while step <= available:
        options.add(step)
        step *= 2
    options.update({available, max(1, available // 2), max(1, (3 * available) // 4)})
    return sorted(o for o in options if o <= available)


def _score(objective: Objective) -> Callable[[Candidate], tuple[float, ...]]:
    def key(candidate: Candidate) -> tuple[float, ...]:
        p = candidate.prediction
        if objective == "per-dollar":
            return (p.tokens_per_usd, candidate.inventory_tok_s, -p.tpot_ms)
        if objective == "per-accelerator":
            return (p.tok_s_per_accelerator, candidate.inventory_tok_s, -p.tpot_ms)
        return (candidate.inventory_tok_s, p.tokens_per_usd, -p.tpot_ms)

    return key


def _largest_batch(model: CostModel, mix: Mix, slo_ms: float, upper: int) -> Prediction | None:
    """The prediction at the largest batch in [m, upper] whose TPOT <= slo_ms (None when even b = m is slow)."""
    low = mix.microbatches
    if upper < low:
        return None
    first = model.predict(replace(mix, batch_per_attention_node=low))
    if first.tpot_ms > slo_ms:
        return None
    top = model.predict(replace(mix, batch_per_attention_node=upper))
    if top.tpot_ms <= slo_ms:
        return top
    best, high = first, upper  # invariant: low meets the SLO, high does not
    while high - low > 1:
        middle = (low + high) // 2
        guess = model.predict(replace(mix, batch_per_attention_node=middle))
        if guess.tpot_ms <= slo_ms:
            low, best = middle, guess
        else:
            high = middle
    return best


def _refuse_impossible(model: CostModel, request: PlanRequest) -> None:
    """PlanningError when no FFN pool can hold the weights or no attention kind one request's KV."""
    inventory = request.inventory
    ffn_ok = [k for k, n in inventory.items() if model.ffn_memory_problem(k, n, request.memory_utilization) is None]
    kv = {k: model.max_batch_by_kv(k, request.context_len, request.memory_utilization) for k in inventory}
    attention_ok = [k for k, n in kv.items() if n >= 1]
    costs = model.costs
    problems = []
    if not ffn_ok:
        details = "; ".join(
            f"{n} x {k}: {model.catalog.kind(k).memory_gb.value * n * request.memory_utilization:.0f} GB usable"
            for k, n in inventory.items()
        )
        problems.append(
            f"not enough memory for the experts: the FFN weights need {costs.ffn_weight_bytes / 1e9:.1f} GB "
            f"and even all devices of one kind hold less ({details})"
        )
    if not attention_ok:
        per_request = request.context_len * costs.kv_bytes_per_token + costs.state_bytes_per_request
        details = "; ".join(
            f"{k}: {model.catalog.kind(k).memory_gb.value * request.memory_utilization:.1f} GB usable"
            for k in inventory
        )
        problems.append(
            f"not enough memory for the KV of one request: the attention weights "
            f"({costs.attention_weight_bytes / 1e9:.2f} GB) and one request of {request.context_len} tokens "
            f"({per_request / 1e9:.3f} GB of KV) fit on no attention node ({details})"
        )
    if not problems and len(inventory) == 1:
        # one kind for both roles: some split must leave room for the experts
        kind, count = next(iter(inventory.items()))
        if count < 2 or model.ffn_memory_problem(kind, count - 1, request.memory_utilization) is not None:
            problems.append(
                f"{count} x {kind} cannot hold both roles: after one attention node the other {count - 1} "
                f"cannot hold the FFN weights ({costs.ffn_weight_bytes / 1e9:.1f} GB)"
            )
    if problems:
        raise PlanningError("this inventory cannot serve the model:\n" + "\n".join(f"  - {p}" for p in problems))


def plan(model: CostModel, request: PlanRequest, sweep: bool = False) -> Plan:
    """Every feasible candidate for `request`, best first; PlanningError for an impossible inventory.

    `sweep`: also predict every candidate at smaller batches (Plan.sweep), for the Pareto plot.
    """
    for kind in request.inventory:
        model.catalog.kind(kind)  # unknown kinds: a clear error before any search
    _refuse_impossible(model, request)
    candidates: list[Candidate] = []
    slowest_seen: list[float] = []
    memory_ok = 0
    for attention_kind, attention_available in request.inventory.items():
        kv_limit = model.max_batch_by_kv(attention_kind, request.context_len, request.memory_utilization)
        if kv_limit < 1:
            continue
        for ffn_kind, ffn_available in request.inventory.items():
            same = attention_kind == ffn_kind
            for n_a in _count_options(attention_available - (1 if same else 0)):
                for n_f in _count_options(ffn_available - (n_a if same else 0)):
                    if model.ffn_memory_problem(ffn_kind, n_f, request.memory_utilization) is not None:
                        continue
                    memory_ok += 1
                    replicas = (
                        attention_available // (n_a + n_f)
                        if same
                        else min(attention_available // n_a, ffn_available // n_f)
                    )
                    for m in range(1, request.max_microbatches + 1):
                        mix = Mix(
                            attention_kind=attention_kind,
                            attention_count=n_a,
                            ffn_kind=ffn_kind,
                            ffn_count=n_f,
                            microbatches=m,
                            batch_per_attention_node=m,
                            context_len=request.context_len,
                            link=request.link,
                            prices_usd_per_hour=request.prices_usd_per_hour,
                            dtype=model.dtype,
                            memory_utilization=request.memory_utilization,
                        )
                        found = _largest_batch(model, mix, request.slo_tpot_ms, min(kv_limit, request.max_batch))
                        if found is None:
                            slowest_seen.append(model.predict(mix).tpot_ms)
                            continue
                        candidates.append(Candidate(found, replicas))
    if not memory_ok:
        raise PlanningError(
            "this inventory cannot serve the model: no split of it into an attention pool that holds one "
            f"request's KV at {request.context_len} tokens and an FFN pool that holds the FFN weights "
            f"({model.costs.ffn_weight_bytes / 1e9:.1f} GB) exists"
        )
    if not candidates:
        fastest = min(slowest_seen) if slowest_seen else float("nan")
        raise PlanningError(
            f"no deployment of this inventory meets TPOT <= {request.slo_tpot_ms:g} ms at context "
            f"{request.context_len}: the fastest predicted is {fastest:.2f} ms (one request per microbatch); "
            "raise --slo-tpot-ms, shorten --context or add faster hardware"
        )
    candidates.sort(key=_score(request.objective), reverse=True)
    swept: list[Prediction] = []
    if sweep:
        for candidate in candidates:
            mix = candidate.prediction.mix
            batch = mix.microbatches
            while batch < mix.batch_per_attention_node:
                swept.append(model.predict(replace(mix, batch_per_attention_node=batch)))
                batch *= 2
    return Plan(request, tuple(candidates), _rules(candidates, request.objective), tuple(swept))


def _summary(candidate: Candidate | None) -> dict[str, object] | None:
    if candidate is None:
        return None
    p = candidate.prediction
    return {
        "attention": f"{p.mix.attention_count} x {p.mix.attention_kind}",
        "ffn": f"{p.mix.ffn_count} x {p.mix.ffn_kind}",
        "microbatches": p.mix.microbatches,
        "batch_per_attention_node": p.mix.batch_per_attention_node,
        "tokens_per_usd": round(p.tokens_per_usd, 1),
        "tok_s_per_accelerator": round(p.tok_s_per_accelerator, 3),
        "tpot_ms": round(p.tpot_ms, 3),
    }


def _rules(candidates: list[Candidate], objective: Objective) -> dict[str, object]:
    """Which microbatch rule the best candidate follows, and the best candidate under each rule."""
    best = candidates[0]
    p = best.prediction
    follows_megascale = p.mix.microbatches >= min(p.megascale_microbatches, MAX_MICROBATCHES)
    megascale = next(
        (c for c in candidates if c.prediction.mix.microbatches >= min(c.prediction.megascale_microbatches, 4)), None
    )
    fastafd = next((c for c in candidates if c.prediction.ffn_hidden), None)
    if follows_megascale and p.ffn_hidden:
        regime = "both"
    elif follows_megascale:
        regime = "megascale-infer"
    elif p.ffn_hidden:
        regime = "fastafd"
    else:
        regime = "neither"
    why = (
        f"m = {p.mix.microbatches}: MegaScale-Infer's m >= 2(1 + T_c/T_f) asks for {p.megascale_microbatches} here "
        f"(T_c = {p.link_us:.1f} us, T_f = {p.ffn_us:.1f} us per microbatch over the layers), "
        f"{'met' if follows_megascale else 'not met'}; FFN {'hidden behind' if p.ffn_hidden else 'exposed beyond'} "
        f"attention (T_f {'<=' if p.ffn_hidden else '>'} T_a = {p.attention_us:.1f} us, FastAFD's regime "
        f"{'held' if p.ffn_hidden else 'not held'}). Chosen because it ranks first by {objective} among all "
        "candidates; following a rule where it would cost throughput is not required."
    )
    return {
        "chosen_regime": regime,
        "why": why,
        "best_following_megascale_infer": _summary(megascale),
        "best_following_fastafd": _summary(fastafd),
    }
