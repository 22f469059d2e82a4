"""Content trust: public keys, cosign signature formats, transparency-log entries and the
one signature verification path. Imports only ``proxy.oci`` (and ``proxy.errors``)."""
