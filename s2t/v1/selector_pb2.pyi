from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SelectTrigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECT_TRIGGER_UNSPECIFIED: _ClassVar[SelectTrigger]
    SELECT_TRIGGER_ALWAYS: _ClassVar[SelectTrigger]
    SELECT_TRIGGER_WORKER: _ClassVar[SelectTrigger]
    SELECT_TRIGGER_KL: _ClassVar[SelectTrigger]

class SelectOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECT_OUTCOME_UNSPECIFIED: _ClassVar[SelectOutcome]
    SELECT_OUTCOME_ACCEPTED: _ClassVar[SelectOutcome]
    SELECT_OUTCOME_DIVERGED: _ClassVar[SelectOutcome]
SELECT_TRIGGER_UNSPECIFIED: SelectTrigger
SELECT_TRIGGER_ALWAYS: SelectTrigger
SELECT_TRIGGER_WORKER: SelectTrigger
SELECT_TRIGGER_KL: SelectTrigger
SELECT_OUTCOME_UNSPECIFIED: SelectOutcome
SELECT_OUTCOME_ACCEPTED: SelectOutcome
SELECT_OUTCOME_DIVERGED: SelectOutcome

class CandidatePosition(_message.Message):
    __slots__ = ("position", "candidate_ids", "candidate_probs", "support_ids", "support_probs", "worker_triggered", "worker_trigger_value")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROBS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_PROBS_FIELD_NUMBER: _ClassVar[int]
    WORKER_TRIGGERED_FIELD_NUMBER: _ClassVar[int]
    WORKER_TRIGGER_VALUE_FIELD_NUMBER: _ClassVar[int]
    position: int
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    candidate_probs: _containers.RepeatedScalarFieldContainer[float]
    support_ids: _containers.RepeatedScalarFieldContainer[int]
    support_probs: _containers.RepeatedScalarFieldContainer[float]
    worker_triggered: bool
    worker_trigger_value: float
    def __init__(self, position: _Optional[int] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., candidate_probs: _Optional[_Iterable[float]] = ..., support_ids: _Optional[_Iterable[int]] = ..., support_probs: _Optional[_Iterable[float]] = ..., worker_triggered: _Optional[bool] = ..., worker_trigger_value: _Optional[float] = ...) -> None: ...

class SelectTriggerSpec(_message.Message):
    __slots__ = ("kind", "kl_rate", "kl_threshold")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KL_RATE_FIELD_NUMBER: _ClassVar[int]
    KL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    kind: SelectTrigger
    kl_rate: float
    kl_threshold: float
    def __init__(self, kind: _Optional[_Union[SelectTrigger, str]] = ..., kl_rate: _Optional[float] = ..., kl_threshold: _Optional[float] = ...) -> None: ...

class SelectRequest(_message.Message):
    __slots__ = ("session_id", "step", "prefix_length", "token_ids", "positions", "trigger", "request_id", "slm_model", "slm_weights_sha256", "takeover")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLM_MODEL_FIELD_NUMBER: _ClassVar[int]
    SLM_WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TAKEOVER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    prefix_length: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedCompositeFieldContainer[CandidatePosition]
    trigger: SelectTriggerSpec
    request_id: str
    slm_model: str
    slm_weights_sha256: str
    takeover: bool
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., prefix_length: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[_Union[CandidatePosition, _Mapping]]] = ..., trigger: _Optional[_Union[SelectTriggerSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., slm_model: _Optional[str] = ..., slm_weights_sha256: _Optional[str] = ..., takeover: _Optional[bool] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("position", "index", "diverged", "trigger_value", "token_id")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_VALUE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    position: int
    index: int
    diverged: bool
    trigger_value: float
    token_id: int
    def __init__(self, position: _Optional[int] = ..., index: _Optional[int] = ..., diverged: _Optional[bool] = ..., trigger_value: _Optional[float] = ..., token_id: _Optional[int] = ...) -> None: ...

class SelectResponse(_message.Message):
    __slots__ = ("session_id", "step", "outcome", "selections", "session_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    outcome: SelectOutcome
    selections: _containers.RepeatedCompositeFieldContainer[Selection]
    session_length: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., outcome: _Optional[_Union[SelectOutcome, str]] = ..., selections: _Optional[_Iterable[_Union[Selection, _Mapping]]] = ..., session_length: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("session_id", "step", "prefix_length", "token_ids", "max_tokens", "stop_ids", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    prefix_length: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., prefix_length: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("session_id", "step", "token_ids", "session_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    session_length: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., session_length: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class GetSelectorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSelectorInfoResponse(_message.Message):
    __slots__ = ("model_name", "vocab_size", "vocab_sha256", "max_candidates", "max_positions", "max_context_tokens", "max_decode_tokens", "kl_thresholds", "weight_formats", "cpu_capability", "accepts_prefill", "device")
    class KlThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SHA256_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KL_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    CPU_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PREFILL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_size: int
    vocab_sha256: str
    max_candidates: int
    max_positions: int
    max_context_tokens: int
    max_decode_tokens: int
    kl_thresholds: _containers.ScalarMap[str, float]
    weight_formats: str
    cpu_capability: str
    accepts_prefill: bool
    device: str
    def __init__(self, model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., vocab_sha256: _Optional[str] = ..., max_candidates: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_decode_tokens: _Optional[int] = ..., kl_thresholds: _Optional[_Mapping[str, float]] = ..., weight_formats: _Optional[str] = ..., cpu_capability: _Optional[str] = ..., accepts_prefill: _Optional[bool] = ..., device: _Optional[str] = ...) -> None: ...
