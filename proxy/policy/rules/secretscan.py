"""Credentials in image metadata: ``ENV`` entries of the image config and the ``created_by``
lines of its history (what ``docker history`` shows, build ``ARG``s included).

A ``Finding`` names the variable (or nothing, for a token found outside an assignment) and
the pattern that matched — never the value, so a report can be logged and shown safely.

What counts as a secret, most specific first:

- known token shapes anywhere in a value or line: ``private-key-pem`` (a PEM ``PRIVATE KEY``
  header), ``aws-access-key-id`` (``AKIA``/``ASIA`` + 16), ``aws-secret-access-key`` (40
  base64 characters assigned to a name or key mentioning AWS and SECRET), ``github-token``
  (``gh[pousr]_…``, ``github_pat_…``), ``gitlab-token``, ``slack-token``, ``slack-webhook``,
  ``google-api-key``, ``stripe-key``, ``npm-token``, ``jwt``, and ``url-credentials``
  (``scheme://user:password@``, unless the password is a ``$VARIABLE``);
- by name: a variable named ``PASSWORD``/``*_PASSWORD`` (also ``PASSWD``, ``*_PASS``),
  ``*_TOKEN``, ``*_SECRET`` (``SECRET_KEY``, ``SECRET_KEY_BASE``), ``*_API_KEY``/``APIKEY``/
  ``*_ACCESS_KEY``, ``*_PRIVATE_KEY`` with a real value (``generic-password``,
  ``generic-token``, ``generic-secret``, ``generic-api-key``, ``generic-private-key``).
  Names ending ``_FILE``, ``_URL``, ``_PATH`` … do not end in those words, so
  ``TOKEN_URL=https://…`` and ``DB_PASSWORD_FILE=/run/secrets/db`` pass;
- ``high-entropy``: a single-token value of 20+ base64/base64url characters with letters and
  digits whose Shannon entropy is at least 4.5 bits per character — or, for values too short
  to reach 4.5 (under ~38 characters), at least 86 % of the most their length allows (a
  random 20-character base62 string scores about 4.0 of a possible 4.32). Hex strings
  (digests, GPG fingerprints, checksums) top out at 4 bits and are excluded outright, as
  are paths, URLs and version strings, and variables whose names say the value is public
  (``*_SHA256``, ``*_CHECKSUM``, ``*_VERSION``, ``GPG_KEY``, ``*_URL``, …).

Placeholders are not secrets: empty values, ``$VAR``/``${VAR}``/``$(cmd)`` references,
``<…>``/``{{…}}`` templates, one repeated character (``xxxx``, ``****``), absolute paths
(a file that holds the secret), values containing ``EXAMPLE`` (AWS's documented keys) and
the words in ``PLACEHOLDERS`` — ``changeme`` among them: it is a documented "set me" value,
not a leaked credential. ``GPG_KEY`` (python images) is a public key fingerprint: not secret.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# Token shapes that are secrets wherever they appear. Group names map to pattern names.
_TOKENS = {
    "private_key_pem": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    "aws_access_key_id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "aws_secret_access_key": (
        r"(?i:aws_?secret(?:_?access)?_?key)[\"']?\s*[:= ]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
    ),
    "github_token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})\b",
    "gitlab_token": r"\bglpat-[A-Za-z0-9_-]{20,}",
    "slack_token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "slack_webhook": r"https://hooks\.slack\.com/services/[A-Za-z0-9_]+/[A-Za-z0-9_]+/[A-Za-z0-9_]{8,}",
    "google_api_key": r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
    "stripe_key": r"\b[rs]k_live_[0-9A-Za-z]{20,}",
    "npm_token": r"\bnpm_[A-Za-z0-9]{36}\b",
    "jwt": r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    "url_credentials": r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@\"']+:(?P<url_password>[^\s/@\"']+)@",
}
_TOKEN_RE = re.compile("|".join(f"(?P<{name}>{source})" for name, source in _TOKENS.items()))
# Cheap pre-check: every token pattern contains one of these (most lines contain none).
_TOKEN_HINT = re.compile(
    r"PRIVATE KEY|AKIA|ASIA|(?i:aws_?secret)|gh[pousr]_|github_pat_|glpat-|xox|hooks\.slack|AIza|k_live_|npm_|eyJ|://[^\s/]*@"
)

_SECRET_NAME = re.compile(
    r"(?:^|_)(?:(?P<generic_password>PASSWORD|PASSWD|(?<=_)PASS)"
    r"|(?P<generic_token>TOKEN)"
    r"|(?P<generic_secret>SECRET|SECRET_KEY|SECRET_KEY_BASE)"
    r"|(?P<generic_private_key>PRIVATE_KEY)"
    r"|(?P<generic_api_key>API_?KEY|ACCESS_KEY))$",
    re.IGNORECASE,
)
# Names that declare their value public: checksums, fingerprints, versions, locations.
_PUBLIC_NAME = re.compile(
    r"(?:^|_)(?:SHA\d*|MD5|CHECKSUMS?|HASH(?:ES)?|DIGEST|FINGERPRINTS?|GPG_?KEYS?|KEY_?IDS?|GPGKEYS?|PGP_?KEYS?"
    r"|VERSION|URL|URI|PATH|DIR|HOME|HOST|FILE)$",
    re.IGNORECASE,
)
# NAME=value in a shell line, a build-arg prefix (``|2 A=1 B=2 /bin/sh -c``) or a flag
# (``--password=…``); the value may be quoted.
_ASSIGNMENT = re.compile(r"(?<![\w$])([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|[^\s;&|]*)")
_HIGH_ENTROPY_CHARS = re.compile(r"^[A-Za-z0-9+/=_-]{20,}$")
_HEX = re.compile(r"^[0-9a-fA-F_-]+=*$")
_VERSION = re.compile(r"^v?\d+(?:[._-]\w+)*$")
_REFERENCE = re.compile(r"^(?:\$\{?\w+\}?|\$\(.*\)|<.*>|\{\{.*\}\}|%\w+%)$")
PLACEHOLDERS = frozenset(
    {
        "changeme", "change-me", "change_me", "changeit", "placeholder", "none", "null", "nil", "undefined",
        "unset", "empty", "todo", "tbd", "redacted", "dummy", "example", "true", "false", "yes", "no",
    }
)  # fmt: skip
MIN_ENTROPY_LENGTH = 20
ENTROPY_BITS = 4.5
ENTROPY_SHORT_FRACTION = 0.86


@dataclass(frozen=True, slots=True)
class Finding:
    """One secret-looking thing: the pattern's name and, for assignments, the variable."""

    pattern: str
    key: str | None = None

    def describe(self) -> str:
        return f"{self.key} ({self.pattern})" if self.key else self.pattern


def scan_env(entries: Iterable[str]) -> list[Finding]:
    """Findings for config ``Env`` entries (``NAME=value``), at most one per variable."""
    findings = []
    for entry in entries:
        name, sep, value = entry.partition("=")
        if sep:
            finding = scan_assignment(name, value)
            if finding is not None:
                findings.append(finding)
    return findings


def scan_assignment(name: str, value: str) -> Finding | None:
    """The most specific pattern ``name=value`` matches, or None."""
    value = _unquote(value)
    if _is_placeholder(value):
        return None
    if _TOKEN_HINT.search(value) or _TOKEN_HINT.search(name):
        token = _first_token(f"{name}={value}")
        if token is not None:
            return Finding(token, name)
    if "AWS" in name.upper() and "SECRET" in name.upper() and re.fullmatch(r"[A-Za-z0-9/+]{40}", value):
        return Finding("aws-secret-access-key", name)
    by_name = _SECRET_NAME.search(name)
    if by_name is not None and by_name.lastgroup is not None and not _is_url_without_credentials(value):
        return Finding(by_name.lastgroup.replace("_", "-"), name)
    if not _PUBLIC_NAME.search(name) and high_entropy(value):
        return Finding("high-entropy", name)
    return None


def scan_text(text: str) -> list[Finding]:
    """Findings in a free-form line (a history ``created_by``): tokens anywhere, attributed
    to the variable they are assigned to when there is one, and suspicious assignments."""
    findings: list[Finding] = []
    assignments = [(m.start(2), m.end(2), m.group(1), m.group(2)) for m in _ASSIGNMENT.finditer(text)]
    if _TOKEN_HINT.search(text):
        for match in _TOKEN_RE.finditer(text):
            pattern = _token_name(match)
            if pattern is None:
                continue
            key = next((name for start, end, name, _ in assignments if start <= match.start() < end), None)
            findings.append(Finding(pattern, key))
    seen = {f.key for f in findings}
    for _, _, name, value in assignments:
        if name not in seen:
            finding = scan_assignment(name, value)
            if finding is not None:
                findings.append(finding)
                seen.add(name)
    return list(dict.fromkeys(findings))


def high_entropy(value: str) -> bool:
    """Whether ``value`` looks like random key material (see the module docstring)."""
    n = len(value)
    if n < MIN_ENTROPY_LENGTH or not _HIGH_ENTROPY_CHARS.match(value) or value.startswith("/"):
        return False
    if _HEX.match(value) or _VERSION.match(value) or value.isalpha() or value.isdigit():
        return False
    if not any(c.isdigit() for c in value) or not any(c.isalpha() for c in value):
        return False
    return shannon_entropy(value) >= min(ENTROPY_BITS, ENTROPY_SHORT_FRACTION * math.log2(n))


def shannon_entropy(text: str) -> float:
    n = len(text)
    return -sum(count / n * math.log2(count / n) for count in Counter(text).values())


def _first_token(text: str) -> str | None:
    for match in _TOKEN_RE.finditer(text):
        pattern = _token_name(match)
        if pattern is not None:
            return pattern
    return None


def _token_name(match: re.Match[str]) -> str | None:
    name = match.lastgroup
    if name == "url_password":  # the inner group closes last: the token is the URL
        name = "url_credentials"
    if name is None or "EXAMPLE" in match.group(0):
        return None
    if name == "url_credentials" and _is_placeholder(match.group("url_password")):
        return None
    return name.replace("_", "-")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _is_placeholder(value: str) -> bool:
    stripped = value.strip()
    if not stripped or len(set(stripped)) == 1 or "EXAMPLE" in stripped:
        return True
    if stripped.startswith("$") or _REFERENCE.match(stripped):
        return True
    if stripped.startswith("/") and " " not in stripped:
        return True
    return stripped.lower() in PLACEHOLDERS


def _is_url_without_credentials(value: str) -> bool:
    scheme, sep, rest = value.partition("://")
    return bool(sep) and scheme.isalpha() and "@" not in rest.partition("/")[0]
