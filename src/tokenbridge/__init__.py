"""tokenbridge: LLM output from generation workers to users through Redis Streams.

Public API: what ``__all__`` lists, plus the HTTP API, the wire format (docs/wire-format.md)
and the CLI. Everything else may change without notice.
"""

from tokenbridge.client import (
    AsyncTokenBridgeClient,
    GenerationStarted,
    StreamEvent,
    TokenBridgeClient,
)
from tokenbridge.consumers.stream_consumer import ConsumerOptions, Delivery, StreamConsumer
from tokenbridge.exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    AuthError,
    ConfigurationError,
    Draining,
    InvalidEntry,
    InvalidRequest,
    LimitExceeded,
    ModelError,
    NotFound,
    PermissionDenied,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RedisUnavailable,
    ServerError,
    TokenBridgeError,
)
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.model_config import ModelConfig
from tokenbridge.processors.analytics import AnalyticsProcessor
from tokenbridge.processors.base import Processor
from tokenbridge.processors.cache import CachingProcessor
from tokenbridge.processors.generation_log import LoggingProcessor
from tokenbridge.processors.rate_limit import RateLimitProcessor
from tokenbridge.processors.registry import ProcessorContext
from tokenbridge.processors.stream_processor import StreamProcessor
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.producer.models.base import ChatModel, ChatRequest, Delta, Finish
from tokenbridge.producer.producer import Producer
from tokenbridge.producer.worker import GenerationWorker
from tokenbridge.settings import Settings
from tokenbridge.store.embedded import EmbeddedRedis
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.pipeline import PipelineBatch

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "AnalyticsProcessor",
    "AsyncTokenBridgeClient",
    "AuthError",
    "AuthenticationError",
    "CachingProcessor",
    "ChatModel",
    "ChatRequest",
    "ClientConnection",
    "ConfigurationError",
    "ConnectionManager",
    "ConsumerOptions",
    "Delivery",
    "Delta",
    "Draining",
    "EmbeddedRedis",
    "Event",
    "Finish",
    "GenerationJob",
    "GenerationStarted",
    "GenerationWorker",
    "InvalidEntry",
    "InvalidRequest",
    "LimitExceeded",
    "LoggingProcessor",
    "ModelConfig",
    "ModelError",
    "NotFound",
    "PermissionDenied",
    "PipelineBatch",
    "Processor",
    "ProcessorContext",
    "Producer",
    "ProviderError",
    "ProviderTimeout",
    "RateLimitProcessor",
    "RateLimited",
    "RedisUnavailable",
    "ServerError",
    "SessionFanout",
    "Settings",
    "StreamConsumer",
    "StreamEvent",
    "StreamProcessor",
    "TokenBridgeClient",
    "TokenBridgeError",
    "__version__",
    "decode_entry",
]
