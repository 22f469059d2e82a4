"""The catalog: what the cache knows about its content — tags, which manifests each
repository holds, what each manifest references, which repositories have been shown to hold
each digest (proofs), sizes and pull statistics. Every SQL statement on ``catalog.db`` lives
in this package (``sql``); the registry layer talks to the ``Catalog`` protocol
(``interface``), implemented on the local file by ``LocalCatalog`` (``local``).

Rows are written after the bytes they describe are committed to the store, so a row never
points at bytes that were not fully written; ``reconcile`` drops rows whose files vanished.
"""

from proxy.registry.catalog.interface import Catalog, CatalogSnapshot, ManifestInfo, TagEntry
from proxy.registry.catalog.local import LocalCatalog
from proxy.registry.catalog.sql import PINNED, CatalogDatabase

__all__ = [
    "PINNED",
    "Catalog",
    "CatalogDatabase",
    "CatalogSnapshot",
    "LocalCatalog",
    "ManifestInfo",
    "TagEntry",
]
