"""The docker files name things that exist: COPY sources, pyproject extras, the CLI entry, compose paths.

No docker daemon here: these are static checks of docker/Dockerfile, docker/compose.yaml and
docker/README.md against the repository.
"""
from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project runs on 3.11 in CI
    tomllib = pytest.importorskip("tomli")

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKER = REPOSITORY / "docker"
PYPROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_copy_sources_exist_and_cover_every_package_folder() -> None:
    copied = []
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            for source in words[:-1]:
                assert (REPOSITORY / source).exists(), f"{keyword} {source}: no such path in the build context"
                copied.append(source.rstrip("/"))
    # setuptools needs every folder that pyproject maps to a package inside the image.
    for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        top = folder.split("/")[0]
        assert top in copied, f"pyproject maps a package to {folder!r}, but the Dockerfile does not COPY {top}"


def test_pip_extras_exist_in_pyproject() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    installed = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "RUN":
            for match in re.finditer(r"\.\[([A-Za-z0-9_,\-]+)\]", arguments):
                installed += match.group(1).split(",")
    assert installed, "the Dockerfile installs spindle with no extras"
    for extra in installed:
        assert extra in extras, f"the Dockerfile installs extra {extra!r}, which pyproject does not define"


def test_installs_are_editable() -> None:
    # A later non-editable `pip install .[extra]` would replace the editable spindle in /opt/spindle.
    for keyword, arguments in dockerfile_instructions():
        if keyword == "RUN":
            for command in arguments.split("&&"):
                if re.search(r"pip install .*'?\.\[", command):
                    assert " -e " in f" {command} ", f"non-editable install of the project: {command.strip()}"


def test_cli_entry_resolves() -> None:
    entry = PYPROJECT["project"]["scripts"]["spindle"]
    module_name, _, attribute = entry.partition(":")
    assert callable(getattr(importlib.import_module(module_name), attribute))
    commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword in ("CMD", "ENTRYPOINT")]
    assert commands and "spindle" in commands[-1]


def test_ray_dependency_has_the_jobs_api_and_train() -> None:
    # The head's dashboard (Jobs API, which `spindle submit` uses) comes with ray[default]; TorchTrainer
    # with ray[train].
    ray = [dependency for dependency in PYPROJECT["project"]["dependencies"] if re.match(r"ray\b", dependency)]
    assert ray, "pyproject does not depend on ray"
    extras = set(re.search(r"\[([^\]]*)\]", ray[0]).group(1).replace(" ", "").split(","))
    assert {"default", "train"} <= extras, f"{ray[0]}: `spindle submit` needs ray[default,train]"


def test_compose_builds_from_the_repository_and_mounts_shared_runs() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"head", "worker"} <= set(services)
    build = services["head"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPOSITORY and (context / build["dockerfile"]).is_file()
    workdir = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "WORKDIR"][-1]
    for name, service in services.items():
        assert service["image"] == services["head"]["image"], name
        assert "ray start" in service["command"] and "--block" in service["command"], name
        targets = [volume.rsplit(":", 1)[-1] for volume in service["volumes"]]
        assert f"{workdir}/runs" in targets, f"{name} does not mount the shared run directory"
        environment = "\n".join(service["environment"])
        assert "RAY_AUTH_TOKEN" in environment, f"{name}: every node needs the cluster token"
    assert "--head" in services["head"]["command"] and "--dashboard-host=0.0.0.0" in services["head"]["command"]


def test_readme_names_existing_files() -> None:
    text = (DOCKER / "README.md").read_text()
    for path in re.findall(r"\b((?:configs|docker)/[\w.\-/]+\.(?:yaml|yml|md)|docker/Dockerfile)\b", text):
        assert (REPOSITORY / path).exists(), f"docker/README.md names {path}, which does not exist"
