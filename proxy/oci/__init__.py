"""The OCI vocabulary, with no I/O: digests, image references and the one rule for
normalizing them (Docker Hub aliases, ``library/``, host case, default ports), manifest
media types, globs over image names, and the one parser of untrusted JSON (size and depth
bounded before parsing). The bottom layer: imports nothing else of ``proxy``
but ``proxy.errors``."""
