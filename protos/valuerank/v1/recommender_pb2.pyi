from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_UNSPECIFIED: _ClassVar[Event]
    EVENT_IMPRESSION: _ClassVar[Event]
    EVENT_CLICK: _ClassVar[Event]
    EVENT_CONVERSION: _ClassVar[Event]
EVENT_UNSPECIFIED: Event
EVENT_IMPRESSION: Event
EVENT_CLICK: Event
EVENT_CONVERSION: Event

class ReloadModelRequest(_message.Message):
    __slots__ = ("model_dir",)
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    def __init__(self, model_dir: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model_version", "previous_version", "load_seconds", "steady_rss_bytes", "peak_rss_bytes")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEADY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    previous_version: str
    load_seconds: float
    steady_rss_bytes: int
    peak_rss_bytes: int
    def __init__(self, model_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., load_seconds: _Optional[float] = ..., steady_rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("sparse", "dense")
    class SparseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DenseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    sparse: _containers.ScalarMap[str, int]
    dense: _containers.ScalarMap[str, float]
    def __init__(self, sparse: _Optional[_Mapping[str, int]] = ..., dense: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "surface", "context", "k", "num_candidates", "force_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    FORCE_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: int
    surface: str
    context: Context
    k: int
    num_candidates: int
    force_path: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[int] = ..., surface: _Optional[str] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., k: _Optional[int] = ..., num_candidates: _Optional[int] = ..., force_path: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "expected_value")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    rank: int
    expected_value: float
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., expected_value: _Optional[float] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("retrieve_ms", "route_ms", "score_ms", "total_ms", "queue_ms")
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    retrieve_ms: float
    route_ms: float
    score_ms: float
    total_ms: float
    queue_ms: float
    def __init__(self, retrieve_ms: _Optional[float] = ..., route_ms: _Optional[float] = ..., score_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class RoutingDecision(_message.Message):
    __slots__ = ("policy", "reason", "estimated_uplift", "propensity", "segment", "depth")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_UPLIFT_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    policy: str
    reason: str
    estimated_uplift: float
    propensity: float
    segment: str
    depth: int
    def __init__(self, policy: _Optional[str] = ..., reason: _Optional[str] = ..., estimated_uplift: _Optional[float] = ..., propensity: _Optional[float] = ..., segment: _Optional[str] = ..., depth: _Optional[int] = ..., **kwargs) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("request_id", "items", "path", "model_version", "timings", "routing", "num_candidates")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    path: str
    model_version: str
    timings: StageTimings
    routing: RoutingDecision
    num_candidates: int
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., path: _Optional[str] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., routing: _Optional[_Union[RoutingDecision, _Mapping]] = ..., num_candidates: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "surface", "context", "item_ids", "path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: int
    surface: str
    context: Context
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    path: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[int] = ..., surface: _Optional[str] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., item_ids: _Optional[_Iterable[int]] = ..., path: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "scores", "path", "model_version", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    path: str
    model_version: str
    timings: StageTimings
    def __init__(self, request_id: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ..., path: _Optional[str] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("request_id", "item_id", "event", "revenue")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REVENUE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: int
    event: Event
    revenue: float
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[int] = ..., event: _Optional[_Union[Event, str]] = ..., revenue: _Optional[float] = ...) -> None: ...

class ReportOutcomesRequest(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...

class ReportOutcomesResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "unknown_requests")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    unknown_requests: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., unknown_requests: _Optional[int] = ...) -> None: ...

class GetRoutingStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SegmentStats(_message.Message):
    __slots__ = ("segment", "surface", "user_tier", "inferences", "revenue", "revenue_per_inference", "compute_ms", "estimated_uplift", "cheap_share")
    class InferencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RevenueEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RevenuePerInferenceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ComputeMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    USER_TIER_FIELD_NUMBER: _ClassVar[int]
    INFERENCES_FIELD_NUMBER: _ClassVar[int]
    REVENUE_FIELD_NUMBER: _ClassVar[int]
    REVENUE_PER_INFERENCE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_UPLIFT_FIELD_NUMBER: _ClassVar[int]
    CHEAP_SHARE_FIELD_NUMBER: _ClassVar[int]
    segment: str
    surface: str
    user_tier: str
    inferences: _containers.ScalarMap[str, float]
    revenue: _containers.ScalarMap[str, float]
    revenue_per_inference: _containers.ScalarMap[str, float]
    compute_ms: _containers.ScalarMap[str, float]
    estimated_uplift: float
    cheap_share: float
    def __init__(self, segment: _Optional[str] = ..., surface: _Optional[str] = ..., user_tier: _Optional[str] = ..., inferences: _Optional[_Mapping[str, float]] = ..., revenue: _Optional[_Mapping[str, float]] = ..., revenue_per_inference: _Optional[_Mapping[str, float]] = ..., compute_ms: _Optional[_Mapping[str, float]] = ..., estimated_uplift: _Optional[float] = ..., cheap_share: _Optional[float] = ...) -> None: ...

class GetRoutingStatsResponse(_message.Message):
    __slots__ = ("policy", "budget_use", "latency_p99_ms", "segments", "json")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    policy: str
    budget_use: float
    latency_p99_ms: float
    segments: _containers.RepeatedCompositeFieldContainer[SegmentStats]
    json: str
    def __init__(self, policy: _Optional[str] = ..., budget_use: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., segments: _Optional[_Iterable[_Union[SegmentStats, _Mapping]]] = ..., json: _Optional[str] = ..., **kwargs) -> None: ...
