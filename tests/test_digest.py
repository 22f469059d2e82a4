import pytest

from proxy.errors import DigestInvalid
from proxy.oci.digest import Digest


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sha256:" + "0" * 64, None),
        ("sha512:" + "f" * 128, None),
        ("sha256:" + "0" * 63, "invalid sha256 digest"),
        ("sha256:" + "A" * 64, "invalid sha256 digest"),
        ("sha512:" + "f" * 64, "invalid sha512 digest"),
        ("md5:" + "0" * 32, "unsupported digest algorithm"),
        ("sha256", "invalid digest"),
        ("sha256:../../etc", "invalid digest"),
        ("", "invalid digest"),
        ("sha256:" + "0" * 64 + "\n", "invalid digest"),  # '$' would match before a final newline
    ],
)
def test_parse(text: str, error: str | None) -> None:
    if error is None:
        assert str(Digest.parse(text)) == text
    else:
        with pytest.raises(DigestInvalid, match=error):
            Digest.parse(text)


def test_of_and_hasher_agree() -> None:
    digest = Digest.of(b"hello")
    hasher = digest.hasher()
    hasher.update(b"hello")
    assert digest.matches(hasher.hexdigest())
    assert str(digest) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
