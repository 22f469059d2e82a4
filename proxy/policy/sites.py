"""An image as a policy judges it: its reference as written, where it sits in a workload
(the JSON pointer that patches it, the container or volume name) and the container's
effective user. The admission layer finds sites in Kubernetes objects; the policy layer
evaluates them, so the type lives here, below both."""

from __future__ import annotations

from dataclasses import dataclass

MAX_WARNING = 120  # kubectl shows longer warnings, but the API server docs ask for ≤ 120


@dataclass(frozen=True, slots=True)
class ImageSite:
    """One image reference in an object, with the JSON pointer that patches it."""

    pointer: str  # RFC 6901, e.g. /spec/template/spec/containers/0/image
    field: str  # containers, initContainers, ephemeralContainers or volumes
    name: str
    image: str
    # Effective securityContext.runAsUser / runAsNonRoot (container over pod), None if unset.
    run_as_user: int | None = None
    run_as_non_root: bool | None = None

    def describe(self) -> str:
        noun = "volume" if self.field == "volumes" else "container"
        return f'{noun} "{self.name}" image "{self.image}"'


def clip(text: str, limit: int = MAX_WARNING) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
