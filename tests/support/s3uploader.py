"""A replica that dies mid-upload: ``python -m tests.support.s3uploader`` reads a storage
config (JSON, env ``UPLOADER_CONFIG``) and a blob's digest and size, uploads ``parts``
full parts of it through ``ObjectStore.upload``, prints ``parts-sent``, and then waits
forever without committing, so a test can ``kill -9`` it at a known point."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from proxy.config.settings import build
from proxy.config.storage import StorageConfig
from proxy.oci.digest import Digest
from proxy.registry.objectstore import ObjectStore
from tests.support.polling import eventually

READY = "parts-sent"


async def main() -> None:
    spec = json.loads(os.environ["UPLOADER_CONFIG"])
    config: StorageConfig = build(StorageConfig, spec["storage"], "storage")
    digest, size, parts = Digest.parse(spec["digest"]), int(spec["size"]), int(spec["parts"])
    async with ObjectStore.open(config) as store, store.upload(digest, size) as upload:
        # Same bytes as the test's blob: a deterministic pattern it can rebuild.
        await upload.write(bytes(range(256)) * (parts * config.part_size // 256 + 1))
        await eventually(lambda: upload.uploaded_parts >= parts, timeout=60)
        print(READY, flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
