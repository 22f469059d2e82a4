"""The pull-through cache: routing a request to an upstream, manifests (tags, digests),
blobs with their shared downloads, the content-addressed store, the catalog of what the cache
holds, eviction, and the ``Mirror`` facade over all of them. Never imports ``policy``,
``admission`` or ``http``."""
