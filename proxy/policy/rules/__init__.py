"""The ``spec.rules`` kinds of a policy: reference rules, image-content rules and the
signature rule, with ``kinds`` naming each by its key."""
