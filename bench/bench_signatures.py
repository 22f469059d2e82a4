"""Benchmark: what a ``signatures`` rule costs per image, in-process.

- cached: the verification cache answers (a Deployment's second replica, or any review of a
  digest verified within the TTL) — target < 2 ms;
- cold: fetch the ``.sig`` manifest and payload from a signature source answering from
  memory (the mirror's cache when it holds them) and verify ECDSA P-256, with and without a
  Rekor entry; with the real mirror cold, upstream round-trips come on top (the signature
  manifest and the payload blob, both formats looked up concurrently).

    python bench/bench_signatures.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.oci.digest import Digest  # noqa: E402
from proxy.trust.verification import SignaturePolicy, VerificationCache, verify_image  # noqa: E402
from tests.signer import MemoryRegistry, Rekor, generate_key, sign_bundle, sign_legacy  # noqa: E402

IMAGE = "sha256:" + "ab" * 32
REF = "ghcr.io/acme/app"


async def measure(rounds: int) -> dict[str, float]:
    key, rekor = generate_key(), Rekor()
    cases = {
        "cold, legacy .sig": (sign_legacy(IMAGE, REF, [key]), None),
        "cold, legacy .sig + Rekor entry": (sign_legacy(IMAGE, REF, [key], rekor), rekor),
        "cold, sigstore bundle (referrers)": (sign_bundle(IMAGE, REF, [key]), None),
    }
    results: dict[str, float] = {}
    digest = Digest.parse(IMAGE)
    for name, (artifact, log) in cases.items():
        source = MemoryRegistry()
        source.push("acme/app", artifact)
        policy = SignaturePolicy.from_pem({"release": key.public_pem}, log_key=log.public_pem if log else None)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            result = await verify_image(source, "acme/app", [digest], policy)
            samples.append(time.perf_counter() - started)
            assert result.allowed, result.message()
        results[name] = statistics.median(samples)
    cache = VerificationCache()
    cache.put(digest, await verify_image(source, "acme/app", [digest], policy))
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert cache.get(digest) is not None
        samples.append(time.perf_counter() - started)
    results["cached (verification cache hit)"] = statistics.median(samples)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    results = asyncio.run(measure(args.rounds))
    print("| verification | median per image (µs) | target |")
    print("|---|---|---|")
    for name, seconds in results.items():
        target = "< 2 ms" if name.startswith("cached") else ""
        print(f"| {name} | {seconds * 1e6:.1f} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
