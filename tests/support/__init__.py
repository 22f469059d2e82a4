"""Helpers that run the real components for end-to-end tests.

- ``images``: OCI image layouts (images, multi-platform indexes, Docker schema2 variant).
- ``registry``: Distribution (``docker-registry``) upstream, optional token auth or proxy
  mode, access-log request counting.
- ``tokenserver``: Docker token-flow JWT issuer.
- ``containerd``: private containerd + ``ctr`` pulls through a hosts.toml mirror.
- ``skopeo``: skopeo copy/inspect; ``procs``: ports, commands with timeouts, daemons.
"""
