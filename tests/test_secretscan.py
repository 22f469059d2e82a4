"""The secret detector: true positives per pattern, and the ordinary env and history lines
of real base images that must not be reported (false positives).

Token-shaped test values are assembled from pieces so this file itself does not look like a
leaked credential to repository secret scanners."""

from __future__ import annotations

import pytest

from proxy.policy.rules.secretscan import Finding, high_entropy, scan_assignment, scan_env, scan_text, shannon_entropy

AWS_ID = "AKIA" + "Z3MHALPQJ7Y4KXNB"
AWS_SECRET = "PtYgjmUhBel31iEl2hpC" + "hYgCfrL1spNxnyVmihA+"  # 40 base64 characters
GITHUB = "ghp" + "_" + "menCkhvMdgaKjIg8xNbe3nNyjOq9wMxEhh2F"
GITHUB_FINE = "github_pat_" + "11ABCDEFG0" + "a1B2c3D4e5F6g7H8i9J0kL"
GITLAB = "glpat" + "-" + "xY9zK2mN4pQ7rS1tU3vW"
SLACK = "xoxb" + "-1234567890-abcdefghijKLMN"
SLACK_HOOK = "https://hooks.slack.com/services/" + "T0ABCDEF1/B0ABCDEF2/" + "abcdEFGHijklMNOP1234"
GOOGLE = "AIza" + "SyA1bC2dE3fG4hI5jK6lM7nO8pQ9rS0tU1v"
STRIPE = "sk" + "_live_" + "51HqLyjWDarjtT1zdp7dc"
NPM = "npm" + "_" + "a1B2c3D4e5F6g7H8i9J0a1B2c3D4e5F6g7H8"
JWT = "eyJ" + "hbGciOiJIUzI1NiJ9.eyJ" + "zdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM = "-----BEGIN " + "RSA PRIVATE KEY-----"
RANDOM_20 = "RIBXuDL7DxtpYlSXpfKt"
RANDOM_32 = "JKY40uvSwMFLZDe1f8rESQedUStPKR0C"
RANDOM_43 = "KXSc7Tvo_hBKqFYY_kv5ZJr3J1TWDtkwtDDb-xHKas1"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # --- true positives: token shapes, whatever the name ---------------------------------
        (f"AWS_ACCESS_KEY_ID={AWS_ID}", Finding("aws-access-key-id", "AWS_ACCESS_KEY_ID")),
        (f"KEY={AWS_ID}", Finding("aws-access-key-id", "KEY")),
        (f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}", Finding("aws-secret-access-key", "AWS_SECRET_ACCESS_KEY")),
        (f"AWS_SECRET={AWS_SECRET}", Finding("aws-secret-access-key", "AWS_SECRET")),
        (f"TLS_KEY={PEM}\nMIIEow...", Finding("private-key-pem", "TLS_KEY")),
        (f"GH={GITHUB}", Finding("github-token", "GH")),
        (f"GH={GITHUB_FINE}", Finding("github-token", "GH")),
        (f"GITLAB={GITLAB}", Finding("gitlab-token", "GITLAB")),
        (f"SLACK={SLACK}", Finding("slack-token", "SLACK")),
        (f"ALERTS={SLACK_HOOK}", Finding("slack-webhook", "ALERTS")),
        (f"MAPS={GOOGLE}", Finding("google-api-key", "MAPS")),
        (f"STRIPE={STRIPE}", Finding("stripe-key", "STRIPE")),
        (f"NPM_AUTH={NPM}", Finding("npm-token", "NPM_AUTH")),
        (f"SESSION={JWT}", Finding("jwt", "SESSION")),
        ("DATABASE_URL=postgres://app:s3cr3tP4ss@db:5432/app", Finding("url-credentials", "DATABASE_URL")),
        ("PIP_INDEX_URL=https://ci:hunter2@pypi.internal/simple", Finding("url-credentials", "PIP_INDEX_URL")),
        # --- true positives: secret names with a real value ------------------------------------
        ("DB_PASSWORD=hunter2", Finding("generic-password", "DB_PASSWORD")),
        ("PASSWORD=hunter2", Finding("generic-password", "PASSWORD")),
        ("MYSQL_ROOT_PASSWORD=root", Finding("generic-password", "MYSQL_ROOT_PASSWORD")),
        ("REDIS_PASS=x7", Finding("generic-password", "REDIS_PASS")),
        ("db_passwd='p4ss word'", Finding("generic-password", "db_passwd")),
        ("GITHUB_TOKEN=abc123", Finding("generic-token", "GITHUB_TOKEN")),
        ("VAULT_TOKEN=s.abcdef", Finding("generic-token", "VAULT_TOKEN")),
        ("CLIENT_SECRET=xyz", Finding("generic-secret", "CLIENT_SECRET")),
        ("SECRET_KEY_BASE=deadbeef", Finding("generic-secret", "SECRET_KEY_BASE")),
        ("DJANGO_SECRET_KEY=abc", Finding("generic-secret", "DJANGO_SECRET_KEY")),
        ("STRIPE_API_KEY=abc", Finding("generic-api-key", "STRIPE_API_KEY")),
        ("SENDGRID_APIKEY=abc", Finding("generic-api-key", "SENDGRID_APIKEY")),
        ("JWT_PRIVATE_KEY=abc", Finding("generic-private-key", "JWT_PRIVATE_KEY")),
        ("ADMIN_PASSWORD=password", Finding("generic-password", "ADMIN_PASSWORD")),  # weak, but real
        # --- true positives: high entropy under an innocent name -------------------------------
        (f"SESSION_KEY={RANDOM_20}", Finding("high-entropy", "SESSION_KEY")),
        (f"COOKIE={RANDOM_32}", Finding("high-entropy", "COOKIE")),
        (f"SIGNING={RANDOM_43}", Finding("high-entropy", "SIGNING")),
        # --- false positives of real base images (python, node, nginx, golang, openjdk) --------
        ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", None),
        ("LANG=C.UTF-8", None),
        ("HOME=/root", None),
        ("PYTHON_VERSION=3.12.1", None),
        ("GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305", None),  # a public key fingerprint
        ("PYTHON_SHA256=8de0e5a4f5b1e0c0c8b2b3f5e7e1a1b2c3d4e5f60718293a4b5c6d7e8f901234", None),
        ("PYTHON_GET_PIP_URL=https://github.com/pypa/get-pip/raw/e03e1607/public/get-pip.py", None),
        ("NODE_VERSION=20.11.0", None),
        ("YARN_VERSION=1.22.19", None),
        ("NGINX_VERSION=1.25.3", None),
        ("NJS_VERSION=0.8.2", None),
        ("PKG_RELEASE=1~bookworm", None),
        ("GOLANG_VERSION=1.21.5", None),
        ("GOPATH=/go", None),
        ("JAVA_HOME=/opt/java/openjdk", None),
        ("JAVA_VERSION=jdk-17.0.9+9", None),
        ("JAVA_OPTS=-Xmx512m -XX:+UseG1GC", None),
        ("LS_COLORS=rs=0:di=01;34:ln=01;36:mh=00:pi=40;33:so=01;35:do=01;35:bd=40;33;01", None),
        ("PIP_NO_CACHE_DIR=1", None),
        ("HOSTNAME=web-7d9f8c6b5-x2x4k", None),
        ("OTEL_SERVICE_NAME=checkoutservice", None),
        ("GOSU_VERSION=1.17", None),
        ("TINI_SHA256=93dcc18adc78c65a028a84799ecf8ad40c936fdfc5f2a57b1acda5a8117fa82c", None),
        ("IMAGE_DIGEST=sha256:93dcc18adc78c65a028a84799ecf8ad40c936fdfc5f2a57b1acda5a8117fa82c", None),
        ("BUILD_ID=550e8400-e29b-41d4-a716-446655440000", None),
        ("SPRING_PROFILES_ACTIVE=production,kubernetes", None),
        ("CLASSNAME=VeryLongCamelCaseIdentifierName", None),
        # --- false positives: names that mention tokens but hold none ---------------------------
        ("TOKEN_URL=https://auth.example.com/oauth/token", None),
        ("AUTH_TOKEN_URL=https://auth.example.com/token", None),
        ("TOKEN_ENDPOINT=https://auth.example.com/token", None),
        ("DB_PASSWORD_FILE=/run/secrets/db", None),
        ("PASSWORD_MIN_LENGTH=12", None),
        ("SECRETS_DIR=/run/secrets", None),
        ("KEY_ID=web-2024", None),
        ("PWD=/app", None),
        ("BYPASS=yes", None),
        ("GITHUB_TOKEN=https://vault.internal/v1/github", None),  # a URL without credentials
        # --- placeholders -------------------------------------------------------------------------
        ("DB_PASSWORD=", None),
        ("DB_PASSWORD=changeme", None),
        ("DB_PASSWORD=CHANGEME", None),
        ("API_TOKEN=$TOKEN", None),
        ("API_TOKEN=${TOKEN}", None),
        ("API_TOKEN=<your token>", None),
        ("API_TOKEN={{ .Values.token }}", None),
        ("API_TOKEN=xxxxxxxx", None),
        ("API_TOKEN=********", None),
        ("DB_PASSWORD=/run/secrets/db", None),
        ('DB_PASSWORD=""', None),
        ("USE_TOKEN=true", None),
        (f"AWS_ACCESS_KEY_ID={'AKIAIOSFODNN7' + 'EXAMPLE'}", None),  # AWS's documented example key
        ("DATABASE_URL=postgres://app:${DB_PASSWORD}@db/app", None),
        ("DATABASE_URL=postgres://db:5432/app", None),
    ],
)
def test_env(entry: str, expected: Finding | None) -> None:
    assert scan_env([entry]) == ([expected] if expected else [])


def test_env_reports_each_variable_once_in_order() -> None:
    env = ["PATH=/bin", f"A={AWS_ID}", "LANG=C.UTF-8", "DB_PASSWORD=hunter2", "NOEQUALS"]
    assert [f.describe() for f in scan_env(env)] == ["A (aws-access-key-id)", "DB_PASSWORD (generic-password)"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # classic builder, BuildKit, build args on RUN steps, flags, URLs, bare tokens
        ("/bin/sh -c #(nop)  ENV DB_PASSWORD=hunter2", ["DB_PASSWORD (generic-password)"]),
        ("ENV DB_PASSWORD=hunter2", ["DB_PASSWORD (generic-password)"]),
        (f"ARG GITHUB_TOKEN={GITHUB}", ["GITHUB_TOKEN (github-token)"]),
        (f"|1 NPM_TOKEN={NPM} /bin/sh -c npm ci", ["NPM_TOKEN (npm-token)"]),
        (
            f"RUN |2 NPM_TOKEN={NPM} VERSION=1.2 /bin/sh -c npm ci # buildkit",
            ["NPM_TOKEN (npm-token)"],
        ),
        ("RUN |1 PIP_TOKEN=abc123 /bin/sh -c pip install . # buildkit", ["PIP_TOKEN (generic-token)"]),
        ("/bin/sh -c mysql --password=Sup3rS3cret! -e 'select 1'", ["password (generic-password)"]),
        ("/bin/sh -c curl -fsSL https://bob:pa55word@example.com/x | sh", ["url-credentials"]),
        (f"/bin/sh -c echo {AWS_ID} > /root/.aws/id", ["aws-access-key-id"]),
        (f"/bin/sh -c aws configure set aws_secret_access_key {AWS_SECRET}", ["aws-secret-access-key"]),
        (f"/bin/sh -c printf '{PEM}' > /key.pem", ["private-key-pem"]),
        (
            f"/bin/sh -c #(nop)  ENV A={AWS_ID} B=hunter2 C_PASSWORD=hunter2",
            ["A (aws-access-key-id)", "C_PASSWORD (generic-password)"],
        ),
        # ordinary history lines of real images
        ("/bin/sh -c #(nop) ADD file:5d673e5c7c4a8f1d2b0c9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b in / ", []),
        ('/bin/sh -c #(nop)  CMD ["python3"]', []),
        ("/bin/sh -c #(nop)  ENV GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305", []),
        ("ENV PYTHON_VERSION=3.12.1", []),
        ("ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", []),
        (
            "RUN /bin/sh -c set -eux; apt-get update; apt-get install -y --no-install-recommends "
            "ca-certificates netbase tzdata; rm -rf /var/lib/apt/lists/* # buildkit",
            [],
        ),
        (
            '/bin/sh -c set -eux; wget -O python.tar.xz "https://www.python.org/ftp/python/${PYTHON_VERSION%%[a-z]*}/'
            'Python-$PYTHON_VERSION.tar.xz"; echo "$PYTHON_SHA256 *python.tar.xz" | sha256sum -c -',
            [],
        ),
        ("RUN |1 TARGETARCH=amd64 /bin/sh -c go build -o /app ./cmd/app # buildkit", []),
        ("ARG DB_PASSWORD", []),
        ("ARG DB_PASSWORD=", []),
        ('RUN /bin/sh -c echo "token=$TOKEN" > .npmrc # buildkit', []),
        ("COPY --from=build /app /app # buildkit", []),
        ("LABEL org.opencontainers.image.source=https://github.com/acme/web", []),
        ("", []),
    ],
)
def test_history_line(line: str, expected: list[str]) -> None:
    assert [f.describe() for f in scan_text(line)] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (RANDOM_20, True),
        (RANDOM_32, True),
        (RANDOM_43, True),
        ("a" * 40, False),
        ("0123456789abcdef0123456789abcdef01234567", False),  # hex: digests, fingerprints
        ("550e8400-e29b-41d4-a716-446655440000", False),  # a UUID is hex too
        ("VeryLongCamelCaseIdentifierName", False),  # no digits
        ("12345678901234567890123", False),  # no letters
        ("x1y2", False),  # short
        ("/usr/local/bin/Rk8s2Lq9Zp3Xv7Nw4Mt1", False),  # a path
        ("https://example.com/Rk8s2Lq9Zp3Xv7Nw4Mt1", False),  # a URL
        ("1.2.3-rc1+build.20240101.abcdef", False),  # a version
        ("aaaaaaaaaabbbbbbbbbb1111111111", False),  # long but repetitive
    ],
)
def test_high_entropy(value: str, expected: bool) -> None:
    assert high_entropy(value) is expected


def test_shannon_entropy() -> None:
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == 2.0
    assert round(shannon_entropy("aabb"), 6) == 1.0


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("X", "", None),
        ("X_TOKEN", "'quoted-value'", "generic-token"),
        ("X", f'"{AWS_ID}"', "aws-access-key-id"),
        ("x_token", "abc", "generic-token"),  # names match case-insensitively
    ],
)
def test_assignment(name: str, value: str, expected: str | None) -> None:
    found = scan_assignment(name, value)
    assert (found.pattern if found else None) == expected
    if found is not None:
        assert value.strip("'\"") not in found.describe(), "never the value"
