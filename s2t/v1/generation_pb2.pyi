from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_GREEDY: _ClassVar[Mode]
    MODE_S2T: _ClassVar[Mode]
    MODE_LLM: _ClassVar[Mode]
    MODE_S2T_LOCAL: _ClassVar[Mode]
    MODE_TAKEOVER: _ClassVar[Mode]

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_ALWAYS: _ClassVar[Trigger]
    TRIGGER_ENTROPY: _ClassVar[Trigger]
    TRIGGER_MARGIN: _ClassVar[Trigger]
    TRIGGER_KL: _ClassVar[Trigger]

class VerifyPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFY_POLICY_UNSPECIFIED: _ClassVar[VerifyPolicy]
    VERIFY_POLICY_WAIT: _ClassVar[VerifyPolicy]
    VERIFY_POLICY_COMMIT_AFTER_LAG: _ClassVar[VerifyPolicy]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
MODE_UNSPECIFIED: Mode
MODE_GREEDY: Mode
MODE_S2T: Mode
MODE_LLM: Mode
MODE_S2T_LOCAL: Mode
MODE_TAKEOVER: Mode
TRIGGER_UNSPECIFIED: Trigger
TRIGGER_ALWAYS: Trigger
TRIGGER_ENTROPY: Trigger
TRIGGER_MARGIN: Trigger
TRIGGER_KL: Trigger
VERIFY_POLICY_UNSPECIFIED: VerifyPolicy
VERIFY_POLICY_WAIT: VerifyPolicy
VERIFY_POLICY_COMMIT_AFTER_LAG: VerifyPolicy
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("mode", "max_new_tokens", "num_candidates", "trigger", "trigger_rate", "block_size", "verify_policy", "verify_deadline_ms", "commit_lag_ms", "max_inflight_blocks", "draft_confidence", "draft_when_unsure", "branch_when_unsure", "temperature", "top_p", "seed")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_RATE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_POLICY_FIELD_NUMBER: _ClassVar[int]
    VERIFY_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_WHEN_UNSURE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_WHEN_UNSURE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    max_new_tokens: int
    num_candidates: int
    trigger: Trigger
    trigger_rate: float
    block_size: int
    verify_policy: VerifyPolicy
    verify_deadline_ms: int
    commit_lag_ms: int
    max_inflight_blocks: int
    draft_confidence: float
    draft_when_unsure: bool
    branch_when_unsure: bool
    temperature: float
    top_p: float
    seed: int
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., max_new_tokens: _Optional[int] = ..., num_candidates: _Optional[int] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., trigger_rate: _Optional[float] = ..., block_size: _Optional[int] = ..., verify_policy: _Optional[_Union[VerifyPolicy, str]] = ..., verify_deadline_ms: _Optional[int] = ..., commit_lag_ms: _Optional[int] = ..., max_inflight_blocks: _Optional[int] = ..., draft_confidence: _Optional[float] = ..., draft_when_unsure: _Optional[bool] = ..., branch_when_unsure: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "conversation", "options", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    conversation: Conversation
    options: GenerationOptions
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("prompt", "conversation", "options", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    conversation: Conversation
    options: GenerationOptions
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("mode_requested", "mode_used", "degraded_reason", "prompt_tokens", "completion_tokens", "verified_tokens", "unverified_tokens", "positions_checked", "picks_changed", "local_decisions", "selector_calls", "selector_failures", "resyncs", "drafted_tokens", "rolled_back_tokens", "triggered_positions", "wall_s", "tokens_per_s", "time_to_first_token_s", "selector_bytes_sent", "selector_bytes_received", "llm_forwards", "reranked_positions", "adapter_version", "seed", "branch_drafted_tokens", "branches_adopted", "branch_missed_position", "branch_missed_candidate")
    MODE_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PICKS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_CALLS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRIGGERED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LLM_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    RERANKED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BRANCH_DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_ADOPTED_FIELD_NUMBER: _ClassVar[int]
    BRANCH_MISSED_POSITION_FIELD_NUMBER: _ClassVar[int]
    BRANCH_MISSED_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    mode_requested: Mode
    mode_used: Mode
    degraded_reason: str
    prompt_tokens: int
    completion_tokens: int
    verified_tokens: int
    unverified_tokens: int
    positions_checked: int
    picks_changed: int
    local_decisions: int
    selector_calls: int
    selector_failures: int
    resyncs: int
    drafted_tokens: int
    rolled_back_tokens: int
    triggered_positions: int
    wall_s: float
    tokens_per_s: float
    time_to_first_token_s: float
    selector_bytes_sent: int
    selector_bytes_received: int
    llm_forwards: int
    reranked_positions: int
    adapter_version: str
    seed: int
    branch_drafted_tokens: int
    branches_adopted: int
    branch_missed_position: int
    branch_missed_candidate: int
    def __init__(self, mode_requested: _Optional[_Union[Mode, str]] = ..., mode_used: _Optional[_Union[Mode, str]] = ..., degraded_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., verified_tokens: _Optional[int] = ..., unverified_tokens: _Optional[int] = ..., positions_checked: _Optional[int] = ..., picks_changed: _Optional[int] = ..., local_decisions: _Optional[int] = ..., selector_calls: _Optional[int] = ..., selector_failures: _Optional[int] = ..., resyncs: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., rolled_back_tokens: _Optional[int] = ..., triggered_positions: _Optional[int] = ..., wall_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., selector_bytes_sent: _Optional[int] = ..., selector_bytes_received: _Optional[int] = ..., llm_forwards: _Optional[int] = ..., reranked_positions: _Optional[int] = ..., adapter_version: _Optional[str] = ..., seed: _Optional[int] = ..., branch_drafted_tokens: _Optional[int] = ..., branches_adopted: _Optional[int] = ..., branch_missed_position: _Optional[int] = ..., branch_missed_candidate: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    stats: GenerationStats
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: GenerateResponse
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
