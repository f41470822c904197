"""Prometheus metrics of the router: vLLM's names where the meaning is the same, plus AFD's own.

Each router owns a registry (tests run several routers in one process). Request latencies are measured
here, where the client's request lives; node-side figures (KV usage, queue lengths, activation traffic,
FFN busy time, expert load) arrive with the heartbeats and are exported as gauges/counters labelled by
node.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]
        self.model_name = model_name
        self.num_requests_running = Gauge(
            "vllm:num_requests_running", "Requests being generated on attention nodes.", label, registry=r
        )
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests queued at the router or on attention nodes.", label, registry=r
        )
        self.kv_cache_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Mean KV cache usage of the attention nodes (1 = full).", label, registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", label, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens.", label, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency.", label, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests.", [*label, "finished_reason"], registry=r
        )
        self.requests_rejected = Counter(
            "afd:requests_rejected", "Requests refused at admission.", [*label, "reason"], registry=r
        )
        self.requests_migrated = Counter(
            "afd:requests_migrated", "Requests moved to another attention node after a failure.", label, registry=r
        )
        node = ["node_id"]
        self.nodes = Gauge("afd:nodes", "Nodes by role and state.", ["role", "state"], registry=r)
        self.activation_bytes = Counter(
            "afd:activation_bytes", "Activation bytes between attention and FFN nodes.", ["direction"], registry=r
        )
        self.layer_round_trips = Counter(
            "afd:layer_round_trips", "Attention->FFN->attention exchanges per layer.", ["layer"], registry=r
        )
        self.layer_round_trip_seconds = Counter(
            "afd:layer_round_trip_seconds",
            "Time from dispatch to combine per layer (transfer both ways + FFN compute); divide by round trips.",
            ["layer"],
            registry=r,
        )
        self.layer_wait_seconds = Counter(
            "afd:layer_wait_seconds",
            "Time attention nodes were blocked waiting for FFN partial sums per layer: the part of "
            "afd:layer_round_trip_seconds the microbatch pipeline did not hide.",
            ["layer"],
            registry=r,
        )
        self.layer_activation_bytes = Counter(
            "afd:layer_activation_bytes",
            "Activation bytes between attention and FFN nodes per layer (afd:activation_bytes split by layer).",
            ["layer", "direction"],
            registry=r,
        )
        self.ffn_busy = Gauge("afd:ffn_busy_fraction", "Share of wall time an FFN node computes.", node, registry=r)
        self.expert_tokens = Counter("afd:expert_tokens", "Tokens routed to each expert.", ["expert"], registry=r)
        self.node_expert_tokens = Counter(
            "afd:ffn_expert_tokens",
            "Tokens each FFN node computed for each expert it held (replicas of a hot expert share its load).",
            ["node_id", "expert"],
            registry=r,
        )
        # Per attention node: the cluster-wide vllm: gauges above are sums/means of these.
        self.node_requests_running = Gauge(
            "afd:node_requests_running", "Requests in an attention node's decode batch.", node, registry=r
        )
        self.node_requests_waiting = Gauge(
            "afd:node_requests_waiting", "Requests queued on an attention node.", node, registry=r
        )
        self.node_kv_cache_usage = Gauge(
            "afd:node_kv_cache_usage_perc", "KV cache usage of an attention node (1 = full).", node, registry=r
        )
        self.node_tokens_per_second = Gauge(
            "afd:node_tokens_per_second",
            "Smoothed tokens per second a node reports: generated (attention) or token rows computed (FFN).",
            ["node_id", "role"],
            registry=r,
        )
        self.placement_version = Gauge("afd:placement_version", "Version of the expert placement.", registry=r)

    PER_NODE = ("ffn_busy", "node_requests_running", "node_requests_waiting", "node_kv_cache_usage")
    """Gauges labelled by node_id alone: a node that left has its series removed (`forget_node`)."""

    def forget_node(self, node_id: str) -> None:
        """Drop a departed node's gauges, so dashboards stop showing its last value as if current."""
        # KeyError: older prometheus_client raises it for a series never set (an FFN node has no KV gauge).
        for name in self.PER_NODE:
            with contextlib.suppress(KeyError):
                getattr(self, name).remove(node_id)
        for role in ("attention", "ffn"):
            with contextlib.suppress(KeyError):
                self.node_tokens_per_second.remove(node_id, role)

    def render(self) -> bytes:
        return generate_latest(self.registry)
