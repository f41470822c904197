from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_ATTENTION: _ClassVar[Role]
    ROLE_FFN: _ClassVar[Role]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_JOINING: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_LEFT: _ClassVar[NodeState]
    NODE_STATE_DEAD: _ClassVar[NodeState]
ROLE_UNSPECIFIED: Role
ROLE_ATTENTION: Role
ROLE_FFN: Role
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_JOINING: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_LEFT: NodeState
NODE_STATE_DEAD: NodeState

class CapacityProfile(_message.Message):
    __slots__ = ("device_kind", "device_memory_bytes", "device_count", "attention_us_per_token", "attention_context_len", "ffn_us_per_token_expert", "link_bytes_per_second", "kv_cache_blocks", "kv_block_size", "max_num_seqs", "link_latency_us", "peer_links")
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_US_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    FFN_US_PER_TOKEN_EXPERT_FIELD_NUMBER: _ClassVar[int]
    LINK_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    LINK_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    PEER_LINKS_FIELD_NUMBER: _ClassVar[int]
    device_kind: str
    device_memory_bytes: int
    device_count: int
    attention_us_per_token: float
    attention_context_len: int
    ffn_us_per_token_expert: float
    link_bytes_per_second: float
    kv_cache_blocks: int
    kv_block_size: int
    max_num_seqs: int
    link_latency_us: float
    peer_links: _containers.RepeatedCompositeFieldContainer[PeerLink]
    def __init__(self, device_kind: _Optional[str] = ..., device_memory_bytes: _Optional[int] = ..., device_count: _Optional[int] = ..., attention_us_per_token: _Optional[float] = ..., attention_context_len: _Optional[int] = ..., ffn_us_per_token_expert: _Optional[float] = ..., link_bytes_per_second: _Optional[float] = ..., kv_cache_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., link_latency_us: _Optional[float] = ..., peer_links: _Optional[_Iterable[_Union[PeerLink, _Mapping]]] = ...) -> None: ...

class PeerLink(_message.Message):
    __slots__ = ("peer_id", "bytes_per_second", "latency_us", "exchanges", "mean_exchange_us")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    MEAN_EXCHANGE_US_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    bytes_per_second: float
    latency_us: float
    exchanges: int
    mean_exchange_us: float
    def __init__(self, peer_id: _Optional[str] = ..., bytes_per_second: _Optional[float] = ..., latency_us: _Optional[float] = ..., exchanges: _Optional[int] = ..., mean_exchange_us: _Optional[float] = ...) -> None: ...

class PlacementEntry(_message.Message):
    __slots__ = ("node_id", "address", "experts", "mlp_share")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MLP_SHARE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    experts: _containers.RepeatedScalarFieldContainer[int]
    mlp_share: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., experts: _Optional[_Iterable[int]] = ..., mlp_share: _Optional[float] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("version", "num_experts", "nodes", "dead_nodes", "degraded_nodes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    DEAD_NODES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_NODES_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_experts: int
    nodes: _containers.RepeatedCompositeFieldContainer[PlacementEntry]
    dead_nodes: _containers.RepeatedScalarFieldContainer[str]
    degraded_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., num_experts: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[PlacementEntry, _Mapping]]] = ..., dead_nodes: _Optional[_Iterable[str]] = ..., degraded_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    logit_bias: _containers.ScalarMap[int, float]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., min_tokens: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("token_id", "logprob", "rank", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerTransfer(_message.Message):
    __slots__ = ("layer", "round_trips", "seconds", "bytes_sent", "bytes_received", "wait_seconds")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    round_trips: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    wait_seconds: float
    def __init__(self, layer: _Optional[int] = ..., round_trips: _Optional[int] = ..., seconds: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("num_running", "num_waiting", "kv_cache_usage", "busy_fraction", "expert_token_counts", "generated_tokens", "transfers")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    busy_fraction: float
    expert_token_counts: _containers.RepeatedScalarFieldContainer[int]
    generated_tokens: int
    transfers: _containers.RepeatedCompositeFieldContainer[LayerTransfer]
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., busy_fraction: _Optional[float] = ..., expert_token_counts: _Optional[_Iterable[int]] = ..., generated_tokens: _Optional[int] = ..., transfers: _Optional[_Iterable[_Union[LayerTransfer, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "role", "address", "capacity", "transports", "model_fingerprint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    address: str
    capacity: CapacityProfile
    transports: _containers.RepeatedScalarFieldContainer[str]
    model_fingerprint: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., capacity: _Optional[_Union[CapacityProfile, _Mapping]] = ..., transports: _Optional[_Iterable[str]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "placement")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    placement: Placement
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "state", "load", "placement_version", "capacity")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    load: NodeLoad
    placement_version: int
    capacity: CapacityProfile
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., placement_version: _Optional[int] = ..., capacity: _Optional[_Union[CapacityProfile, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("placement", "drain", "microbatches")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    drain: bool
    microbatches: int
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ..., drain: _Optional[bool] = ..., microbatches: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerFailureReport(_message.Message):
    __slots__ = ("reporter_id", "peer_id", "error", "degraded")
    REPORTER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    reporter_id: str
    peer_id: str
    error: str
    degraded: bool
    def __init__(self, reporter_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., error: _Optional[str] = ..., degraded: _Optional[bool] = ...) -> None: ...

class PeerFailureResponse(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "resume_output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESUME_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    resume_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., resume_output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("request_id", "token_ids", "finished", "finish_reason", "num_prompt_tokens", "num_output_tokens", "logprobs", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("deadline_seconds",)
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    deadline_seconds: float
    def __init__(self, deadline_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("num_unfinished",)
    NUM_UNFINISHED_FIELD_NUMBER: _ClassVar[int]
    num_unfinished: int
    def __init__(self, num_unfinished: _Optional[int] = ...) -> None: ...

class UpdatePlacementResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "role", "state", "capacity", "load", "placement_version", "experts")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    state: NodeState
    capacity: CapacityProfile
    load: NodeLoad
    placement_version: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., state: _Optional[_Union[NodeState, str]] = ..., capacity: _Optional[_Union[CapacityProfile, _Mapping]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., placement_version: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("version", "experts")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenChannelRequest(_message.Message):
    __slots__ = ("attention_node_id", "transport", "rendezvous")
    ATTENTION_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    attention_node_id: str
    transport: str
    rendezvous: bytes
    def __init__(self, attention_node_id: _Optional[str] = ..., transport: _Optional[str] = ..., rendezvous: _Optional[bytes] = ...) -> None: ...

class OpenChannelResponse(_message.Message):
    __slots__ = ("rendezvous",)
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    rendezvous: bytes
    def __init__(self, rendezvous: _Optional[bytes] = ...) -> None: ...

class CloseChannelRequest(_message.Message):
    __slots__ = ("attention_node_id",)
    ATTENTION_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    attention_node_id: str
    def __init__(self, attention_node_id: _Optional[str] = ...) -> None: ...

class CloseChannelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DataFrame(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    def __init__(self, frame: _Optional[bytes] = ...) -> None: ...
