"""Kubernetes admission: the AdmissionReview model (finding every image in an object)
and the ``/validate`` and ``/mutate`` webhook handlers."""
