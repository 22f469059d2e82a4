"""The OCI vocabulary, with no I/O: digests, image references and the one rule for
normalizing them (Docker Hub aliases, ``library/``, host case, default ports), manifest
media types, and globs over image names. The bottom layer: imports nothing else of ``proxy``
but ``proxy.errors``."""
