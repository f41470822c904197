"""The model spec: everything both halves need to know about a checkpoint, parsed from HF `config.json`.

One frozen dataclass describes every supported architecture. Attention nodes read the attention,
rope and gate fields; FFN nodes read the per-layer FFN fields; the router reads sizes. Checkpoint
tensor names live in `afd.tensor_names`, keyed by `ModelSpec.family`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from afd.errors import ConfigError, UnsupportedArchitectureError

Family = Literal[
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "minimax",
    "step3p5",
]

#: HF `architectures[0]` -> family. The single source of the supported list.
SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
    "MiniMaxForCausalLM": "minimax",
    "Step3p5ForCausalLM": "step3p5",
}

RopeType = Literal["default", "linear", "llama3", "yarn"]
GateScoring = Literal["softmax", "sigmoid", "topk_softmax"]
"""softmax / sigmoid over all router logits, then top-k; topk_softmax: top-k logits, softmax over those (gpt-oss)."""
GroupLimit = Literal["none", "group_max", "group_top2_sum"]
ExpertActivation = Literal["swiglu", "clamped_swiglu", "limited_swiglu"]
"""swiglu: down(silu(gate) * up); clamped_swiglu: gpt-oss's down((clamp(up) + 1) * g * sigmoid(alpha * g)),
g = gate clamped from above, with biases on both projections; limited_swiglu: Step-3.5's
down(min(silu(gate), limit) * clamp(up, -limit, limit))."""


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary embedding parameters (HF `rope_scaling` / `rope_parameters`)."""

    theta: float
    """Base wavelength."""
    rotary_dim: int
    """Number of leading head dimensions that rotate."""
    rope_type: RopeType = "default"
    """Frequency scaling scheme."""
    factor: float = 1.0
    """Context extension factor (linear, llama3, yarn)."""
    original_max_position: int = 0
    """Pre-training context length (llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    beta_fast: float = 32.0
    """yarn only: extrapolation boundary."""
    beta_slow: float = 1.0
    """yarn only: interpolation boundary."""
    mscale: float = 0.0
    """yarn only: numerator of the cos/sin magnitude correction (0 = not given)."""
    mscale_all_dim: float = 0.0
    """yarn only: denominator of the magnitude correction; also rescales the softmax (DeepSeek)."""
    attention_factor: float | None = None
    """yarn only: explicit cos/sin magnitude; derived from mscale when None."""
    truncate: bool = True
    """yarn only: round the correction range to whole dimensions."""
    interleaved: bool = False
    """Rotate adjacent pairs (x0, x1) instead of halves (x_i, x_{i+d/2}) — DeepSeek's layout."""

    def __post_init__(self) -> None:
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension must be a positive even number, got {self.rotary_dim}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True, slots=True)
class MlaSpec:
    """Multi-head latent attention (DeepSeek-V2/V3): the cache holds the compressed latent."""

    q_lora_rank: int | None
    """Rank of the query compression; None means a plain q_proj."""
    kv_lora_rank: int
    """Width of the cached latent c_kv."""
    qk_nope_head_dim: int
    """Per-head query/key dimensions without rotary embedding."""
    qk_rope_head_dim: int
    """Per-head query/key dimensions with rotary embedding (the key part is shared by all heads)."""
    v_head_dim: int
    """Per-head value dimension."""


@dataclass(frozen=True, slots=True)
class MoeSpec:
    """Routed experts of one MoE layer, and how the gate picks them."""

    num_experts: int
    """Routed experts per layer."""
    top_k: int
    """Experts chosen per token."""
    intermediate_size: int
    """Intermediate width of one routed expert."""
    scoring: GateScoring = "softmax"
    """Gate non-linearity applied to the router logits."""
    norm_topk_prob: bool = False
    """Renormalise the chosen weights to sum to one."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed weights (DeepSeek)."""
    group_limit: GroupLimit = "none"
    """Group-limited top-k: restrict choice to `topk_group` of `n_group` expert groups."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups kept per token."""
    correction_bias: bool = False
    """DeepSeek-V3 `e_score_correction_bias` added to scores for choosing (not for weighting)."""
    shared_intermediate_size: int = 0
    """Total intermediate width of the shared expert(s); 0 when there are none."""
    shared_gate: bool = False
    """Qwen2-MoE: the shared expert output is scaled by sigmoid(shared_expert_gate(x))."""
    router_bias: bool = False
    """The router projection carries a bias (gpt-oss)."""
    activation: ExpertActivation = "swiglu"
    """What a routed expert computes (see ExpertActivation)."""
    swiglu_alpha: float = 1.702
    """clamped_swiglu only: sigmoid gain of the gate."""
    swiglu_limit: float = 7.0
    """clamped_swiglu / limited_swiglu only: bound of the gate (from above) and the up projection (both sides)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"need 1 <= top_k ({self.top_k}) <= num_experts ({self.num_experts})")
        if self.activation in ("clamped_swiglu", "limited_swiglu") and self.swiglu_limit <= 0:
            raise ConfigError(f"swiglu_limit must be positive, got {self.swiglu_limit}")
        if self.group_limit != "none":
            if self.num_experts % self.n_group:
                raise ConfigError(f"num_experts {self.num_experts} not divisible by n_group {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"need 1 <= topk_group ({self.topk_group}) <= n_group ({self.n_group})")


@dataclass(frozen=True, slots=True)
class LayerFfnSpec:
    """What the FFN pool computes for one layer: a dense MLP or routed experts (+ shared)."""

    kind: Literal["dense", "moe"]
    """Dense SwiGLU MLP or mixture of experts."""
    dense_intermediate_size: int = 0
    """Width of the dense MLP (kind == "dense")."""
    moe: MoeSpec | None = None
    """Routed expert description (kind == "moe")."""
    mlp_swiglu_limit: float = 0.0
    """Step-3.5 `swiglu_limits_shared`: bound of min(silu(gate), limit) * clamp(up, +-limit) in this layer's
    dense MLP or shared expert; 0 for the plain SwiGLU."""


@dataclass(frozen=True, slots=True)
class LinearAttentionSpec:
    """MiniMax lightning attention: layers whose attention is a decayed linear recurrence over a fixed-size
    `[heads, head_dim, head_dim]` state per request instead of softmax over a KV cache."""

    layers: tuple[int, ...]
    """Layers with lightning attention (HF `layer_types` "linear_attention"); the others use softmax attention."""
    block_size: int = 256
    """Length of the blocks the reference computes a prefill in (MiniMax `block_size`)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"linear attention block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True, slots=True)
class ResidualScales:
    """MiniMax's decoder layer: x = norm(h); h = alpha * x + beta * sublayer(x) - the residual is the normalised
    input, and each sublayer kind has its own factors. The MLP's beta is its MoE `routed_scaling_factor`."""

    full_attn_alpha: float = 1.0
    """Residual factor after softmax attention."""
    full_attn_beta: float = 1.0
    """Output factor of softmax attention."""
    linear_attn_alpha: float = 1.0
    """Residual factor after lightning attention."""
    linear_attn_beta: float = 1.0
    """Output factor of lightning attention."""
    mlp_alpha: float = 1.0
    """Residual factor after the MLP."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer, as both halves of AFD see it."""

    architecture: str
    """HF class name from config.json `architectures`."""
    family: Family
    """Naming and routing conventions (see SUPPORTED_ARCHITECTURES)."""
    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Residual stream width."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA); equals num_heads for MLA."""
    head_dim: int
    """Per-head width of q/k/v for GQA attention."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    max_position_embeddings: int
    """Longest context the checkpoint supports."""
    rope: RopeSpec
    """Rotary embedding."""
    layers: tuple[LayerFfnSpec, ...]
    """FFN description per layer."""
    hidden_act: str = "silu"
    """Activation of the gated MLPs."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias."""
    o_bias: bool = False
    """Output projection carries a bias."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before rope (Qwen3)."""
    mla: MlaSpec | None = None
    """Set for DeepSeek multi-head latent attention."""
    sliding_num_heads: int = 0
    """Query heads of the sliding layers when they differ from num_heads (Step-3.5); 0: num_heads. Key/value
    heads and head size are the same on every layer, so is the KV cache entry."""
    sliding_rope: RopeSpec | None = None
    """Rotary embedding of the sliding layers when it differs from `rope` (Step-3.5: own theta and rotary share)."""
    head_gate: bool = False
    """Each head's attention output is scaled by sigmoid of its own projection of the layer input (Step-3.5
    `self_attn.g_proj`)."""
    norm_offset: bool = False
    """Every RMSNorm scales by 1 + weight: the stored weights are offsets from one (Step-3.5)."""
    sliding_window: int = 0
    """Keys a query of a sliding layer sees, itself included (HF `sliding_window`); 0 when no layer slides."""
    sliding_layers: tuple[int, ...] = ()
    """Layers that attend only to the last `sliding_window` positions (HF `layer_types` "sliding_attention")."""
    attention_sinks: bool = False
    """Per-head learned logit added to every softmax denominator (gpt-oss `self_attn.sinks`)."""
    linear_attention: LinearAttentionSpec | None = None
    """MiniMax lightning-attention layers (a recurrent state per request, no KV cache); None when there are none."""
    residual_scales: ResidualScales | None = None
    """MiniMax's scaled residual around the normalised input; None for the usual pre-norm residual."""
    softmax_scale: float = 0.0
    """Attention logit scale; derived from the head size when 0."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation unless ignored."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id, if the model uses one."""
    dtype: str = "float32"
    """Checkpoint dtype from config.json (`torch_dtype` / `dtype`)."""
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Unparsed config.json keys, kept for diagnostics."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if len(self.layers) != self.num_layers:
            raise ConfigError(f"{len(self.layers)} layer specs for {self.num_layers} layers")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.sliding_num_heads and (self.sliding_num_heads < 0 or self.sliding_num_heads % self.num_kv_heads):
            raise ConfigError(f"sliding_num_heads {self.sliding_num_heads} not a multiple of {self.num_kv_heads}")
        if self.sliding_layers and self.sliding_window <= 0:
            raise ConfigError(f"sliding layers {self.sliding_layers} need a positive sliding_window")
        if any(not 0 <= layer < self.num_layers for layer in self.sliding_layers):
            raise ConfigError(f"sliding layers {self.sliding_layers} outside [0, {self.num_layers})")
        if self.mla is not None and (self.sliding_layers or self.attention_sinks):
            raise ConfigError("sliding windows and attention sinks are not supported with MLA")
        if self.linear_attention is not None:
            linear = self.linear_attention.layers
            if any(not 0 <= layer < self.num_layers for layer in linear):
                raise ConfigError(f"linear attention layers {linear} outside [0, {self.num_layers})")
            if self.mla is not None or set(linear) & set(self.sliding_layers):
                raise ConfigError("linear attention layers cannot also be MLA or sliding-window layers")
        if self.softmax_scale == 0.0:
            object.__setattr__(self, "softmax_scale", self._default_softmax_scale())

    def _default_softmax_scale(self) -> float:
        if self.mla is None:
            return self.head_dim**-0.5
        scale = (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim) ** -0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def is_moe(self) -> bool:
        return any(layer.kind == "moe" for layer in self.layers)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        return max((layer.moe.num_experts for layer in self.layers if layer.moe), default=0)

    def moe(self, layer: int) -> MoeSpec | None:
        return self.layers[layer].moe

    def layer_num_heads(self, layer: int) -> int:
        """Query heads of `layer` (sliding layers may have their own count, see sliding_num_heads)."""
        if self.sliding_num_heads and layer in self.sliding_layers:
            return self.sliding_num_heads
        return self.num_heads

    def attention_window(self, layer: int) -> int | None:
        """Keys a query of `layer` may see counting back from itself, or None for full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    def is_linear_attention(self, layer: int) -> bool:
        """True for a lightning-attention layer (recurrent state, no paged KV cache)."""
        return self.linear_attention is not None and layer in self.linear_attention.layers

    @property
    def kv_entry_width(self) -> int:
        """Elements cached per token per layer (K and V together for GQA; latent + rope key for MLA)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelSpec:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        architectures = config.get("architectures") or []
        arch = architectures[0] if architectures else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch, sorted(SUPPORTED_ARCHITECTURES))
        return _parse(arch, SUPPORTED_ARCHITECTURES[arch], _Config(config))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction for a context extension `scale`."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class _Config:
    """config.json with typed accessors that name the missing key in their error."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if self.raw.get(key) is not None:
                return self.raw[key]
        return default

    def int(self, *keys: str, default: int | None = None) -> int:
        value = self.get(*keys, default=default)
        if value is None:
            raise ConfigError(f"config.json lacks {' / '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.json {keys[0]} must be an integer, got {value!r}")
        return value

    def float(self, *keys: str, default: float | None = None) -> float:
        value = self.get(*keys, default=default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"config.json {keys[0]} must be a number, got {value!r}")
        return float(value)


def _parse(arch: str, family: Family, c: _Config) -> ModelSpec:
    hidden = c.int("hidden_size")
    num_heads = c.int("num_attention_heads")
    num_layers = c.int("num_hidden_layers")
    mla = _parse_mla(c) if family.startswith("deepseek") else None
    head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else c.int("head_dim", default=hidden // num_heads)
    rotary_dim = mla.qk_rope_head_dim if mla else int(head_dim * _partial_rotary_factor(family, c))
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelSpec(
        architecture=arch,
        family=family,
        vocab_size=c.int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads if mla else c.int("num_key_value_heads", "num_attention_groups", default=num_heads),
        head_dim=head_dim,
        rms_norm_eps=c.float("rms_norm_eps", default=1e-6),
        max_position_embeddings=c.int("max_position_embeddings", default=4096),
        rope=_step3p5_ropes(c, num_layers, head_dim)[0]
        if family == "step3p5"
        else _parse_rope(c, rotary_dim, interleaved=family == "deepseek_v2" or _v3_interleave(family, c)),
        layers=tuple(_parse_layer(family, c, i) for i in range(num_layers)),
        # Step-3.5 configs say "swigluoai"; their reference computes silu with limits (LayerFfnSpec.mlp_swiglu_limit).
        hidden_act="silu" if family == "step3p5" else str(c.get("hidden_act", default="silu")),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", default=False)),
        qkv_bias=_qkv_bias(family, c),
        o_bias=bool(c.get("attention_bias", default=family == "gpt_oss"))
        and family in ("llama", "qwen3", "qwen3_moe", "gpt_oss"),
        qk_norm=family in ("qwen3", "qwen3_moe", "step3p5") or (family == "glm4_moe" and bool(c.get("use_qk_norm"))),
        mla=mla,
        **(_step3p5_attention(c, num_layers, head_dim) if family == "step3p5" else {}),
        **_sliding_windows(family, c, num_layers),
        **_minimax_attention(family, c, num_layers),
        attention_sinks=family == "gpt_oss",
        eos_token_ids=eos_ids,
        bos_token_id=c.get("bos_token_id"),
        dtype=str(c.get("torch_dtype", "dtype", default="float32")),
        extras=dict(c.raw),
    )


def _v3_interleave(family: Family, c: _Config) -> bool:
    return family == "deepseek_v3" and bool(c.get("rope_interleave", default=True))


def _qkv_bias(family: Family, c: _Config) -> bool:
    if family == "qwen2":
        return True  # Qwen2's q/k/v projections always carry a bias; its config has no switch for it
    if family == "qwen2_moe":
        return bool(c.get("qkv_bias", default=True))
    if family in ("llama", "qwen3", "qwen3_moe", "glm4_moe"):
        return bool(c.get("attention_bias", default=False))
    if family == "gpt_oss":
        return bool(c.get("attention_bias", default=True))
    return False


def _partial_rotary_factor(family: Family, c: _Config) -> float:
    """Share of each head that rotates: transformers>=5 keeps it in `rope_parameters`, Hub configs at the top."""
    if family == "minimax":
        return 1.0  # the MiniMax reference rotates whole heads whatever partial_rotary_factor says
    params = c.get("rope_parameters", default=None) or {}
    # GLM-4.5's config class defaults to half-rotary when the key is absent.
    default = 0.5 if family == "glm4_moe" else 1.0
    value = params.get("partial_rotary_factor", c.get("partial_rotary_factor", default=default))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {value!r}")
    return float(value)


def _minimax_attention(family: Family, c: _Config, num_layers: int) -> dict[str, Any]:
    """MiniMax: which layers are lightning attention (HF `layer_types`, else the original config's
    `attn_type_list` with 0 = linear, 1 = softmax, else the config class's alternation starting with softmax),
    and the residual factors."""
    if family != "minimax":
        return {}
    if c.get("sliding_window") is not None:
        raise ConfigError("MiniMax sliding_window is not supported (the published models set none)")
    types = c.get("layer_types", default=None)
    if types is None and c.get("attn_type_list") is not None:
        codes = c.get("attn_type_list")
        if not isinstance(codes, list) or any(code not in (0, 1) for code in codes):
            raise ConfigError(f"config.json attn_type_list must hold 0 (linear) or 1 (softmax), got {codes!r}")
        types = ["full_attention" if code else "linear_attention" for code in codes]
    if types is None:
        types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(f"config.json layer_types must list {num_layers} layers, got {types!r}")
    unknown = set(types) - {"linear_attention", "full_attention"}
    if unknown:
        raise ConfigError(
            f"layer_types {sorted(map(str, unknown))} are not supported for MiniMax; "
            "supported: linear_attention, full_attention"
        )
    linear = tuple(i for i, kind in enumerate(types) if kind == "linear_attention")
    scales = ResidualScales(
        full_attn_alpha=c.float("full_attn_alpha_factor", default=1.0),
        full_attn_beta=c.float("full_attn_beta_factor", default=1.0),
        linear_attn_alpha=c.float("linear_attn_alpha_factor", default=1.0),
        linear_attn_beta=c.float("linear_attn_beta_factor", default=1.0),
        mlp_alpha=c.float("mlp_alpha_factor", default=1.0),
    )
    spec = LinearAttentionSpec(linear, c.int("block_size", default=256)) if linear else None
    return {"linear_attention": spec, "residual_scales": scales}


def _sliding_windows(family: Family, c: _Config, num_layers: int) -> dict[str, Any]:
    """`sliding_window` and `sliding_layers` from HF `layer_types`, or the family's rule when a config lacks it."""
    if family not in ("qwen2", "gpt_oss"):
        return {}
    if family == "qwen2" and not c.get("use_sliding_window", default=False):
        return {}  # Qwen2's config drops `sliding_window` unless use_sliding_window is set
    window = c.get("sliding_window", default=None)
    types = c.get("layer_types", default=None)
    if types is None:
        if family == "gpt_oss":  # its config class alternates, starting with a sliding layer
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        else:
            first = c.int("max_window_layers", default=28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(f"config.json layer_types must list {num_layers} layers, got {types!r}")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        supported = "sliding_attention, full_attention"
        raise ConfigError(f"layer_types {sorted(unknown)} are not supported; supported: {supported}")
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if not sliding or window is None:
        return {}
    return {"sliding_window": c.int("sliding_window"), "sliding_layers": sliding}


def _parse_mla(c: _Config) -> MlaSpec:
    return MlaSpec(
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c.int("kv_lora_rank"),
        qk_nope_head_dim=c.int("qk_nope_head_dim"),
        qk_rope_head_dim=c.int("qk_rope_head_dim"),
        v_head_dim=c.int("v_head_dim"),
    )


def _parse_rope(c: _Config, rotary_dim: int, interleaved: bool) -> RopeSpec:
    # transformers>=5 writes `rope_parameters`; checkpoints on the Hub carry `rope_theta` + `rope_scaling`.
    params = dict(c.get("rope_parameters", default=None) or {})
    params.update(c.get("rope_scaling", default=None) or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3, yarn")
    theta = params.get("rope_theta", c.get("rope_theta", default=10000.0))
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or c.get(
        "original_max_position_embeddings", "max_position_embeddings", default=4096
    )
    if factor is None:
        factor = c.int("max_position_embeddings") / original if rope_type == "yarn" else 1.0
    return RopeSpec(
        theta=float(theta),
        rotary_dim=rotary_dim,
        rope_type=cast(RopeType, rope_type),
        factor=float(factor),
        original_max_position=int(original),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def _parse_layer(family: Family, c: _Config, layer: int) -> LayerFfnSpec:
    dense = LayerFfnSpec(kind="dense", dense_intermediate_size=c.int("intermediate_size"))
    if family in ("llama", "qwen2", "qwen3"):
        return dense
    if family == "glm4_moe":
        return _parse_glm4_moe_layer(c, layer, dense)
    if family == "step3p5":
        return _parse_step3p5_layer(c, layer, dense)
    if family == "gpt_oss":
        moe = MoeSpec(
            num_experts=c.int("num_local_experts", "num_experts"),
            top_k=c.int("num_experts_per_tok"),
            intermediate_size=c.int("intermediate_size"),
            scoring="topk_softmax",
            router_bias=True,
            activation="clamped_swiglu",
            swiglu_alpha=c.float("swiglu_alpha", default=1.702),
            swiglu_limit=c.float("swiglu_limit", default=7.0),
        )
        return LayerFfnSpec(kind="moe", moe=moe)
    if family in ("qwen3_moe", "qwen2_moe"):
        experts = c.int("num_experts", "num_local_experts")
        step = c.int("decoder_sparse_step", default=1)
        if layer in (c.get("mlp_only_layers", default=[]) or []) or experts == 0 or (layer + 1) % step:
            return dense
        shared = c.int("shared_expert_intermediate_size", default=0) if family == "qwen2_moe" else 0
        moe = MoeSpec(
            num_experts=experts,
            top_k=c.int("num_experts_per_tok"),
            intermediate_size=c.int("moe_intermediate_size"),
            norm_topk_prob=bool(c.get("norm_topk_prob", default=False)),
            shared_intermediate_size=shared,
            shared_gate=shared > 0,
        )
        return LayerFfnSpec(kind="moe", moe=moe)
    if family in ("mixtral", "minimax"):
        moe = MoeSpec(
            num_experts=c.int("num_local_experts"),
            top_k=c.int("num_experts_per_tok"),
            intermediate_size=c.int("intermediate_size"),
            norm_topk_prob=True,
            # MiniMax scales the MLP output by mlp_beta_factor; every one of its MLPs is routed.
            routed_scaling_factor=c.float("mlp_beta_factor", default=1.0) if family == "minimax" else 1.0,
        )
        return LayerFfnSpec(kind="moe", moe=moe)
    # DeepSeek-V2 / V3
    experts = c.int("n_routed_experts")
    freq = c.int("moe_layer_freq", default=1)
    if layer < c.int("first_k_dense_replace", default=0) or layer % freq:
        return dense
    moe_inter = c.int("moe_intermediate_size")
    is_v3 = family == "deepseek_v3"
    topk_method = c.get("topk_method", default="noaux_tc" if is_v3 else "greedy")
    group_limit: GroupLimit = {
        "greedy": "none",
        "group_limited_greedy": "group_max",
        "noaux_tc": "group_top2_sum",
    }.get(topk_method, "invalid")  # type: ignore[assignment]
    if group_limit == "invalid" or (is_v3 and topk_method != "noaux_tc"):
        raise ConfigError(f"topk_method {topk_method!r} is not supported for {family}")
    moe = MoeSpec(
        num_experts=experts,
        top_k=c.int("num_experts_per_tok"),
        intermediate_size=moe_inter,
        scoring="sigmoid" if is_v3 else "softmax",
        norm_topk_prob=bool(c.get("norm_topk_prob", default=is_v3)),
        routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
        group_limit=group_limit,
        n_group=c.int("n_group", default=1),
        topk_group=c.int("topk_group", default=1),
        correction_bias=is_v3,
        shared_intermediate_size=moe_inter * c.int("n_shared_experts", default=0),
    )
    return LayerFfnSpec(kind="moe", moe=moe)


def _parse_glm4_moe_layer(c: _Config, layer: int, dense: LayerFfnSpec) -> LayerFfnSpec:
    """GLM-4.5: DeepSeek-V3's router (sigmoid, correction bias, group-limited top-k) after `first_k_dense_replace`
    dense layers; the transformers reference always takes the top-2-sum group score, whatever n_group."""
    if layer < c.int("first_k_dense_replace", default=1):
        return dense
    moe_inter = c.int("moe_intermediate_size")
    moe = MoeSpec(
        num_experts=c.int("n_routed_experts"),
        top_k=c.int("num_experts_per_tok"),
        intermediate_size=moe_inter,
        scoring="sigmoid",
        norm_topk_prob=bool(c.get("norm_topk_prob", default=True)),
        routed_scaling_factor=c.float("routed_scaling_factor", default=1.0),
        group_limit="group_top2_sum",
        n_group=c.int("n_group", default=1),
        topk_group=c.int("topk_group", default=1),
        correction_bias=True,
        shared_intermediate_size=moe_inter * c.int("n_shared_experts", default=1),
    )
    return LayerFfnSpec(kind="moe", moe=moe)


STEP3P5_LAYER_TYPES = ("sliding_attention", "full_attention")


def _step3p5_per_layer(c: _Config, key: str, num_layers: int) -> list[Any] | None:
    """A per-layer list of a Step-3.5 config, without the entries that Hub configs append for their
    `num_nextn_predict_layers` multi-token-prediction layers (which the engine does not run)."""
    value = c.get(key)
    if value is None:
        return None
    lengths = {num_layers, num_layers + c.int("num_nextn_predict_layers", default=0)}
    if not isinstance(value, list) or len(value) not in lengths:
        raise ConfigError(f"config.json {key} must list {num_layers} layers (+ MTP layers), got {value!r}")
    return value[:num_layers]


def _step3p5_layer_types(c: _Config, num_layers: int) -> list[str]:
    types = _step3p5_per_layer(c, "layer_types", num_layers) or ["full_attention"] * num_layers
    unknown = set(types) - set(STEP3P5_LAYER_TYPES)
    if unknown:
        supported = ", ".join(STEP3P5_LAYER_TYPES)
        raise ConfigError(f"layer_types {sorted(map(str, unknown))} are not supported; supported: {supported}")
    return types


def _step3p5_ropes(c: _Config, num_layers: int, head_dim: int) -> tuple[RopeSpec, RopeSpec | None]:
    """Step-3.5's rope of the full layers and, when it has sliding layers, theirs. Each layer type has its own
    theta and rotary share: Hub configs list them per layer (`rope_theta`, `partial_rotary_factors`) and apply
    `rope_scaling` to the types in `yarn_only_types`; transformers' Step3p7TextConfig saves `rope_parameters`
    keyed by layer type (scaling merged into full_attention, its choice when yarn_only_types is absent)."""
    types = _step3p5_layer_types(c, num_layers)
    by_type = c.get("rope_parameters", default=None) or {}
    specs: dict[str, RopeSpec] = {}
    for kind in dict.fromkeys(types):
        if isinstance(by_type.get(kind), dict):
            params = dict(by_type[kind])
        else:
            first = types.index(kind)
            theta = c.get("rope_theta", default=10000.0)
            params = {"rope_type": "default", "rope_theta": theta[first] if isinstance(theta, list) else theta}
            factors = _step3p5_per_layer(c, "partial_rotary_factors", num_layers)
            if factors:
                params["partial_rotary_factor"] = factors[first]
            if kind in (c.get("yarn_only_types", default=None) or ["full_attention"]):
                params.update(c.get("rope_scaling", default=None) or {})
        share = params.get("partial_rotary_factor", 1.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"partial_rotary_factor of {kind} layers must be in (0, 1], got {share!r}")
        rope_config = _Config({"rope_parameters": params, "max_position_embeddings": c.get("max_position_embeddings")})
        specs[kind] = _parse_rope(rope_config, int(head_dim * share), interleaved=False)
    full = specs.get("full_attention", specs.get("sliding_attention"))
    assert full is not None
    sliding = specs.get("sliding_attention")
    return full, (sliding if sliding is not None and sliding != full else None)


def _step3p5_attention(c: _Config, num_layers: int, head_dim: int) -> dict[str, Any]:
    """Step-3.5's attention fields: sliding layers with their own query-head count (Hub `attention_other_setting`,
    transformers' `num_sliding_attention_heads`) and rope, the per-head output gate, offset norms, and the
    `query_pre_attn_scalar` softmax scale."""
    if c.get("attention_bias", default=False):
        raise ConfigError("Step-3.5 with attention_bias is not supported (the published checkpoints have none)")
    types = _step3p5_layer_types(c, num_layers)
    num_heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", "num_attention_groups", default=num_heads)
    other = c.get("attention_other_setting", default=None) or {}
    if not isinstance(other, dict):
        raise ConfigError(f"config.json attention_other_setting must be an object, got {other!r}")
    for key, value in (("num_attention_groups", kv_heads), ("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
        if key in other and other[key] != value:
            # transformers' Step3p7 reads only num_attention_heads from it; so does the engine's one-width KV cache.
            raise ConfigError(
                f"attention_other_setting {key}={other[key]} differs from the full layers' {value}: sliding layers "
                "with their own key/value heads or head size are not supported"
            )
    sliding_heads = c.int("num_sliding_attention_heads", default=int(other.get("num_attention_heads", num_heads)))
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    fields: dict[str, Any] = {
        "head_gate": bool(c.get("use_head_wise_attn_gate", default=True)),
        "norm_offset": True,
        "sliding_rope": _step3p5_ropes(c, num_layers, head_dim)[1],
    }
    if sliding:
        fields |= {"sliding_window": c.int("sliding_window"), "sliding_layers": sliding}
        if sliding_heads != num_heads:
            fields["sliding_num_heads"] = sliding_heads
    scalar = c.get("query_pre_attn_scalar")
    if scalar is not None:
        fields["softmax_scale"] = c.float("query_pre_attn_scalar") ** -0.5
    return fields


def _parse_step3p5_layer(c: _Config, layer: int, dense: LayerFfnSpec) -> LayerFfnSpec:
    """Step-3.5: dense MLPs on the layers outside `moe_layers_enum` (Hub) / `mlp_layer_types` "dense"
    (transformers; both default to layers 0-2), else sigmoid routing with a correction bias (`moe.router_bias`),
    renormalised top-k, `moe_router_scaling_factor`, and an ungated shared expert; `swiglu_limits` bound the
    routed experts, `swiglu_limits_shared` the shared expert or the dense MLP (0 or null: no bound)."""
    num_layers = c.int("num_hidden_layers")
    kinds = _step3p5_per_layer(c, "mlp_layer_types", num_layers)
    if kinds is not None:
        moe_layer = kinds[layer] == "sparse"
    elif c.get("moe_layers_enum") is not None:
        listed = c.get("moe_layers_enum")
        items = listed.split(",") if isinstance(listed, str) else listed
        try:
            moe_layer = layer in {int(item) for item in items if str(item).strip()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config.json moe_layers_enum must list layer numbers, got {listed!r}") from exc
    else:
        moe_layer = layer >= 3
    limits = _step3p5_per_layer(c, "swiglu_limits", num_layers) or [None] * num_layers
    shared_limits = _step3p5_per_layer(c, "swiglu_limits_shared", num_layers) or [None] * num_layers
    mlp_limit = float(shared_limits[layer] or 0.0)
    if not moe_layer:
        return LayerFfnSpec(
            kind="dense", dense_intermediate_size=dense.dense_intermediate_size, mlp_swiglu_limit=mlp_limit
        )
    limit = float(limits[layer] or 0.0)
    moe = MoeSpec(
        num_experts=c.int("n_routed_experts", "moe_num_experts"),
        top_k=c.int("num_experts_per_tok", "moe_top_k"),
        intermediate_size=c.int("moe_intermediate_size"),
        scoring="sigmoid",
        norm_topk_prob=bool(c.get("norm_expert_weight", default=True)),
        routed_scaling_factor=c.float("moe_router_scaling_factor", default=1.0),
        correction_bias=bool(c.get("use_moe_router_bias", default=True)),
        shared_intermediate_size=c.int("share_expert_dim", "share_expert_dims"),
        activation="limited_swiglu" if limit else "swiglu",
        swiglu_limit=limit or 7.0,
    )
    return LayerFfnSpec(kind="moe", moe=moe, mlp_swiglu_limit=mlp_limit)


FINGERPRINT_IGNORED_KEYS = frozenset({"_name_or_path", "transformers_version"})
"""config.json keys that differ between saves of the same model and do not change what it computes."""


def model_fingerprint(model_dir: str | Path) -> str:
    """Identity of a checkpoint's architecture: sha256 of its config.json, keys sorted, whitespace ignored.

    Every node of a cluster must serve the same model; the router refuses a node whose fingerprint differs
    from its own (RegisterRequest.model_fingerprint). It is a check against a wrong --model path, not a
    content hash of the weights (hashing hundreds of GB at every start is not affordable).
    """
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    kept = {key: value for key, value in config.items() if key not in FINGERPRINT_IGNORED_KEYS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
