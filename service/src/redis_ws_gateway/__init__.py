"""Redis pub/sub and Redis Streams to WebSocket clients."""

__version__ = "0.1.0"
