from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage_id", "start", "end", "param_bytes", "device", "format")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    start: int
    end: int
    param_bytes: int
    device: str
    format: str
    def __init__(self, stage_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., param_bytes: _Optional[int] = ..., device: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "stages", "sessions", "max_sessions", "clock_ns", "version", "max_seqs", "max_step_tokens")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_NS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    status: str
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    sessions: int
    max_sessions: int
    clock_ns: int
    version: str
    max_seqs: int
    max_step_tokens: int
    def __init__(self, status: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., clock_ns: _Optional[int] = ..., version: _Optional[str] = ..., max_seqs: _Optional[int] = ..., max_step_tokens: _Optional[int] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("start", "end", "device", "name", "format")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    device: str
    name: str
    format: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., device: _Optional[str] = ..., name: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class LoadStageReply(_message.Message):
    __slots__ = ("stage", "units", "load_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    stage: StageInfo
    units: _containers.RepeatedScalarFieldContainer[str]
    load_s: float
    def __init__(self, stage: _Optional[_Union[StageInfo, _Mapping]] = ..., units: _Optional[_Iterable[str]] = ..., load_s: _Optional[float] = ...) -> None: ...

class UnloadStageRequest(_message.Message):
    __slots__ = ("stage_id",)
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    def __init__(self, stage_id: _Optional[str] = ...) -> None: ...

class UnloadStageReply(_message.Message):
    __slots__ = ("closed_sessions",)
    CLOSED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    closed_sessions: int
    def __init__(self, closed_sessions: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("stage_id", "session")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    session: str
    def __init__(self, stage_id: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class CreateSessionReply(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class SeqChunk(_message.Message):
    __slots__ = ("seq", "tokens", "start", "logits")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    seq: str
    tokens: int
    start: bool
    logits: bool
    def __init__(self, seq: _Optional[str] = ..., tokens: _Optional[int] = ..., start: _Optional[bool] = ..., logits: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session", "data", "attention_mask", "prefill", "all_logits", "top1", "seq", "seqs", "exact")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    ALL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    session: str
    data: Tensor
    attention_mask: Tensor
    prefill: bool
    all_logits: bool
    top1: bool
    seq: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqChunk]
    exact: bool
    def __init__(self, session: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., prefill: _Optional[bool] = ..., all_logits: _Optional[bool] = ..., top1: _Optional[bool] = ..., seq: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqChunk, _Mapping]]] = ..., exact: _Optional[bool] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("session", "data", "is_logits", "is_top1", "seq", "t_in_ns", "t_out_ns", "decode_ns", "encode_ns", "kv_cache_bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    IS_LOGITS_FIELD_NUMBER: _ClassVar[int]
    IS_TOP1_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    T_IN_NS_FIELD_NUMBER: _ClassVar[int]
    T_OUT_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    data: Tensor
    is_logits: bool
    is_top1: bool
    seq: int
    t_in_ns: int
    t_out_ns: int
    decode_ns: int
    encode_ns: int
    kv_cache_bytes: int
    def __init__(self, session: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., is_logits: _Optional[bool] = ..., is_top1: _Optional[bool] = ..., seq: _Optional[int] = ..., t_in_ns: _Optional[int] = ..., t_out_ns: _Optional[int] = ..., decode_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session", "seqs")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    session: str
    seqs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session: _Optional[str] = ..., seqs: _Optional[_Iterable[str]] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("kv_cache_bytes",)
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    kv_cache_bytes: int
    def __init__(self, kv_cache_bytes: _Optional[int] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes", "version")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    version: str
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("received_bytes", "payload", "version")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    payload: bytes
    version: str
    def __init__(self, received_bytes: _Optional[int] = ..., payload: _Optional[bytes] = ..., version: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("peer", "small_bytes", "large_bytes", "rounds", "timeout_s", "version")
    PEER_FIELD_NUMBER: _ClassVar[int]
    SMALL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    peer: str
    small_bytes: int
    large_bytes: int
    rounds: int
    timeout_s: float
    version: str
    def __init__(self, peer: _Optional[str] = ..., small_bytes: _Optional[int] = ..., large_bytes: _Optional[int] = ..., rounds: _Optional[int] = ..., timeout_s: _Optional[float] = ..., version: _Optional[str] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("peer", "rtt_ms", "bandwidth_gbps", "up_gbps", "down_gbps", "bytes", "rounds", "seconds", "version")
    PEER_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    UP_GBPS_FIELD_NUMBER: _ClassVar[int]
    DOWN_GBPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    peer: str
    rtt_ms: float
    bandwidth_gbps: float
    up_gbps: float
    down_gbps: float
    bytes: int
    rounds: int
    seconds: float
    version: str
    def __init__(self, peer: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., bandwidth_gbps: _Optional[float] = ..., up_gbps: _Optional[float] = ..., down_gbps: _Optional[float] = ..., bytes: _Optional[int] = ..., rounds: _Optional[int] = ..., seconds: _Optional[float] = ..., version: _Optional[str] = ...) -> None: ...
