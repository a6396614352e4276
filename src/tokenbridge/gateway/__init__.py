"""Gateway: the ASGI app, fan-out from Redis to client connections, and the transports."""
