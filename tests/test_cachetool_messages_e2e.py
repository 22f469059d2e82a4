"""What the cache tools tell a user (issue 15): ``pullgate import``, ``export``, ``warm``,
``cache ls`` and ``cache prune`` run as processes, their messages read as a new user reads
them: what was done, which number is which, and options that cannot apply refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import skopeo
from tests.support.images import ImageFactory, ImageInfo
from tests.support.procs import Completed, free_port, run
from tests.support.registry import Registry


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "pullgate.yaml"
    dead = f"http://127.0.0.1:{free_port()}"  # an air-gapped site: no upstream answers
    settings = {"cache": {"dir": str(tmp_path / "cache")}, "upstreams": [{"name": "docker.io", "url": dead}]}
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def image(image_factory: ImageFactory) -> ImageInfo:
    return image_factory.image("1", layers=[4_000])


def archive(image: ImageInfo, path: Path, name: str | None) -> Path:
    """``skopeo copy oci:... oci-archive:FILE[:NAME]`` (NAME a full reference, a bare tag, or none)."""
    skopeo.copy(f"oci:{image.layout}:1", f"oci-archive:{path}" + (f":{name}" if name else ""))
    return path


def pullgate(config: Path, *args: str, expect: int = 0) -> Completed:
    done = run([sys.executable, "-m", "proxy", *args, "--config", str(config)], timeout=120, check=False)
    assert done.returncode == expect, f"pullgate {' '.join(args)} -> {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def listed(config: Path) -> dict[str, Any]:
    return {i["reference"]: i for i in json.loads(pullgate(config, "cache", "ls", "--json").stdout)}


# --- item 18: import --no-pin --image ----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "option", "message"),
    [
        ("acme/app:1", "docker.io/other/x:5", "--image docker.io/other/x:5 does not apply: the archive names every"),
        ("acme/app:1", "docker.io/other/x", "--image docker.io/other/x does not apply"),
        ("2.0", "docker.io/other/x:5", "its tag :5 can only name a lone unnamed entry, and the archive tags"),
    ],
)
def test_import_refuses_an_image_option_that_cannot_apply(
    config: Path, image: ImageInfo, tmp_path: Path, name: str, option: str, message: str
) -> None:
    tar = archive(image, tmp_path / "app.tar", name)
    failed = pullgate(config, "import", "--no-pin", "--image", option, str(tar), expect=1)
    assert message in failed.stderr
    assert not (tmp_path / "cache" / "catalog.db").exists() or listed(config) == {}, "nothing imported"


@pytest.mark.parametrize(
    ("name", "option", "reference"),
    [
        ("2.0", "docker.io/other/x", "docker.io/other/x:2.0"),  # the archive's tag, --image's repository
        (None, "docker.io/other/y:7", "docker.io/other/y:7"),  # a lone unnamed entry takes both
    ],
)
def test_import_says_what_it_did_with_the_image_option(
    config: Path, image: ImageInfo, tmp_path: Path, name: str | None, option: str, reference: str
) -> None:
    tar = archive(image, tmp_path / "app.tar", name)
    done = pullgate(config, "import", "--no-pin", "--image", option, str(tar))
    assert f"imported {reference}  {image.manifest_digest}" in done.stdout
    assert "not pinned: revalidated upstream after cache.tag_ttl" in done.stdout
    assert list(listed(config)) == [reference]


def test_import_no_pin_never_unpins_silently(config: Path, image: ImageInfo, tmp_path: Path) -> None:
    tar = archive(image, tmp_path / "app.tar", "acme/app:1")
    first = pullgate(config, "import", str(tar))
    assert "pinned: served without asking an upstream" in first.stdout
    again = json.loads(pullgate(config, "import", "--no-pin", str(tar), "--json").stdout)
    (result,) = again["images"]
    assert (result["pinned"], result["unpinned"]) == (False, True)
    assert "was pinned by an earlier import: --no-pin un-pins it" in result["notes"]
    text = pullgate(config, "import", str(tar)).stdout  # pinned again
    assert "pinned: served without asking an upstream" in text


# --- item 10: prune ------------------------------------------------------------------------------
def test_prune_needs_a_unit_and_keeps_pinned_images(config: Path, image: ImageInfo, tmp_path: Path) -> None:
    failed = pullgate(config, "cache", "prune", "--older-than", "30", "--dry-run", expect=2)
    assert "'30' has no unit: write e.g. 30d, 30h or 30m" in failed.stderr
    pullgate(config, "import", str(archive(image, tmp_path / "app.tar", "acme/app:1")))
    dry = pullgate(config, "cache", "prune", "--older-than", "0s", "--dry-run")
    assert f"would keep docker.io/acme/app:1  {image.manifest_digest}  (pinned by import" in dry.stdout
    assert "would remove docker.io" not in dry.stdout
    data = json.loads(pullgate(config, "cache", "prune", "--older-than", "0s", "--json").stdout)
    assert (data["images"], [i["reference"] for i in data["kept_pinned"]]) == ([], ["docker.io/acme/app:1"])
    assert list(listed(config)) == ["docker.io/acme/app:1"]
    gone = pullgate(config, "cache", "prune", "--older-than", "0s", "--include-pinned")
    assert "removed docker.io/acme/app:1" in gone.stdout
    assert listed(config) == {}


# --- items 14 and 15: export and import errors, sizes and rates ---------------------------------
def test_export_and_import_errors_name_the_users_file(config: Path, image: ImageInfo, tmp_path: Path) -> None:
    pullgate(config, "import", str(archive(image, tmp_path / "app.tar", "acme/app:1")))
    failed = pullgate(config, "export", "acme/app:1", "-o", str(tmp_path / "nodir" / "x.tar"), expect=1)
    assert f"cannot write {tmp_path / 'nodir' / 'x.tar'}: no directory {tmp_path / 'nodir'}" in failed.stderr
    assert ".part" not in failed.stderr, "the hidden temp file is not the user's business"
    failed = pullgate(config, "export", "acme/app:1", "-o", str(tmp_path), expect=1)
    assert f"cannot write {tmp_path}: it is a directory" in failed.stderr
    (tmp_path / "notes.tar").write_text("not a tar archive at all\n")
    failed = pullgate(config, "import", str(tmp_path / "notes.tar"), expect=1)
    message = f"{tmp_path / 'notes.tar'} is not a tar archive"
    assert failed.stderr.count("is not a tar archive") == 1 and message in failed.stderr
    assert "ReadError" not in failed.stderr and "method gz" not in failed.stderr


def test_import_rate_is_never_zero_mb_per_second(config: Path, image: ImageInfo, tmp_path: Path) -> None:
    done = pullgate(config, "import", str(archive(image, tmp_path / "app.tar", "acme/app:1")))
    summary = done.stdout.splitlines()[-1]
    assert "(0 MB/s)" not in summary and summary.endswith("/s)") and "iB/s)" in summary


def test_warm_and_ls_say_which_size_is_which(registry: Registry, image: ImageInfo, repo: str, tmp_path: Path) -> None:
    registry.push(image.layout, "1", f"{repo}:1")
    path = tmp_path / "warm.yaml"
    path.write_text(
        yaml.safe_dump(
            {"cache": {"dir": str(tmp_path / "wcache")}, "upstreams": [{"name": "docker.io", "url": registry.url}]}
        )
    )
    warmed = pullgate(path, "warm", f"{repo}:1")
    (result,) = json.loads(pullgate(path, "warm", f"{repo}:1", "--json").stdout)
    assert "layers and configs:" in warmed.stderr
    (entry,) = listed(path).values()
    assert result["size"] == sum(image.layer_sizes) + len(image.config_bytes)
    assert entry["size"] == result["size"] + len(image.manifest_bytes), "ls counts the manifests too"
    help_text = run([sys.executable, "-m", "proxy", "cache", "--help"], timeout=30).stdout
    assert "SIZE is everything cached for the image: manifests, configs and layers" in " ".join(help_text.split())


def test_uppercase_repository_names_say_names_are_lowercase(config: Path) -> None:
    failed = pullgate(config, "warm", "library/Hello:1", expect=1)
    assert "invalid repository name 'library/Hello': repository names are lowercase" in failed.stderr
