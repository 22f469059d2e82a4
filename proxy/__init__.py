"""pullgate: a pull-through caching mirror for OCI registries and an image-policy
admission webhook, in one asyncio process."""

__version__ = "0.1.0"
