"""The pull-through cache: routing a request to an upstream, manifests (tags, digests),
blobs with their shared downloads, the content-addressed store, the catalog of what the cache
holds (``registry.catalog``), provenance (which repository may be served a stored digest),
eviction, and the ``Mirror`` facade over all of them. Never imports ``policy``,
``admission`` or ``http``."""
