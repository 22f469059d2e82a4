"""The HTTP boundary: the aiohttp application (wiring, middleware, the error boundary),
the distribution-spec pull API handlers, typed app keys and the reloading TLS context."""
