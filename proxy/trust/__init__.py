"""Content trust: public keys, cosign signature formats and Sigstore bundles, trust roots,
Fulcio certificates, transparency-log entries, RFC 3161 timestamps, attestation
requirements and the one verification service. Imports only ``proxy.oci`` (and
``proxy.errors``): metrics and log events are injected (``service.VerificationObserver``)."""
