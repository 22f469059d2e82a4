"""skopeo as the reference push/pull client.

``--insecure-policy`` skips /etc/containers/policy.json (absent on some fresh machines);
TLS verification is off on both sides because every test registry is plain HTTP on
loopback. No ``--retry-times``: tests count upstream requests, retries would blur them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.images import OCI_INDEX, OCI_MANIFEST, OciLayout
from tests.support.procs import Completed, arun, run

DEFAULT_TIMEOUT = 120.0
Creds = tuple[str, str]


def copy_args(src: str, dest: str, *, all_images: bool = True, src_creds: Creds | None = None,
              dest_creds: Creds | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
            "--dest-tls-verify=false"]
    if all_images:
        args.append("--all")
    if src_creds is not None:
        args += ["--src-creds", ":".join(src_creds)]
    if dest_creds is not None:
        args += ["--dest-creds", ":".join(dest_creds)]
    return [*args, *extra, src, dest]


def copy(src: str, dest: str, *, all_images: bool = True, src_creds: Creds | None = None,
         dest_creds: Creds | None = None, extra: tuple[str, ...] = (),
         timeout: float = DEFAULT_TIMEOUT) -> Completed:
    """``skopeo copy SRC DEST``, e.g. ``oci:/dir:tag`` -> ``docker://127.0.0.1:5000/a:1``."""
    return run(copy_args(src, dest, all_images=all_images, src_creds=src_creds,
                         dest_creds=dest_creds, extra=extra), timeout=timeout)


async def acopy(src: str, dest: str, *, all_images: bool = True,
                src_creds: Creds | None = None, dest_creds: Creds | None = None,
                extra: tuple[str, ...] = (), timeout: float = DEFAULT_TIMEOUT) -> Completed:
    return await arun(copy_args(src, dest, all_images=all_images, src_creds=src_creds,
                                dest_creds=dest_creds, extra=extra), timeout=timeout)


def _inspect_args(ref: str, creds: Creds | None, raw: bool) -> list[str]:
    args = ["skopeo", "--insecure-policy", "inspect", "--tls-verify=false"]
    if raw:
        args.append("--raw")
    if creds is not None:
        args += ["--creds", ":".join(creds)]
    return [*args, ref]


def inspect_raw(ref: str, *, creds: Creds | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The manifest bytes exactly as served (``docker://host/repo:tag``)."""
    return run(_inspect_args(ref, creds, True), timeout=timeout).stdout_bytes


async def ainspect_raw(ref: str, *, creds: Creds | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> bytes:
    return (await arun(_inspect_args(ref, creds, True), timeout=timeout)).stdout_bytes


def inspect(ref: str, *, creds: Creds | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """skopeo's summary JSON (Digest, Layers, Architecture, ...)."""
    result: dict[str, Any] = json.loads(
        run(_inspect_args(ref, creds, False), timeout=timeout).stdout)
    return result


def source_ref(layout: Path, tag: str | None) -> str:
    """skopeo source for a tagged image in an OCI layout written by ``tests.support.images``:
    ``oci:LAYOUT:TAG``, or a ``dir:`` export for Docker schema2 media types. ``tag=None``
    means the layout's only image (skopeo's ``oci:LAYOUT``)."""
    if tag is None:
        return f"oci:{layout}"
    oci = OciLayout(layout)
    entry = oci.tagged(tag)
    if entry["mediaType"] in (OCI_MANIFEST, OCI_INDEX):
        return f"oci:{layout}:{tag}"
    export = layout / "dir-exports" / entry["digest"].partition(":")[2]
    return f"dir:{oci.export_dir(tag, export)}"
