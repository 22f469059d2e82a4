"""Content digests: parsing, validation and incremental hashing.

Grammar from the OCI image spec (https://github.com/opencontainers/image-spec/blob/main/descriptor.md#digests):
``algorithm ":" encoded``. Registered algorithms are sha256 (64 lowercase hex) and
sha512 (128 lowercase hex); anything else is rejected, because we cannot verify it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from proxy.errors import DigestInvalid

_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]*")
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)\Z")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.match(text)
        if match is None:
            raise DigestInvalid(f"invalid digest {text[:150]!r}")
        algorithm, encoded = match.groups()
        length = _HEX_LENGTHS.get(algorithm)
        if length is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
            raise DigestInvalid(f"invalid {algorithm} digest {text[:150]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @staticmethod
    def looks_like(text: str) -> bool:
        """True when ``text`` is shaped as a digest rather than a tag (tags cannot hold ':')."""
        return ":" in text

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, hexdigest: str) -> bool:
        return hexdigest == self.hex

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
