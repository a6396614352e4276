"""The public API is what ``tokenbridge.__all__`` lists: this pins it (STYLE.md, section 3)."""

from __future__ import annotations

import tokenbridge

PUBLIC = [
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


def test_all_is_pinned() -> None:
    assert sorted(tokenbridge.__all__) == sorted(PUBLIC)


def test_every_name_resolves() -> None:
    for name in tokenbridge.__all__:
        assert getattr(tokenbridge, name) is not None, name
