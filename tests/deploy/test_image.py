"""The container image, without a Docker engine: hadolint on the Dockerfile, its shape
(multi-stage, non-root, `wecombot` entrypoint, no default command, no build tools in the
final stage), and the build context that .dockerignore lets through — from which the
wheel is built here exactly as the builder stage builds it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import ROOT, SERVICES, of_kind, render, tool
from tests.waiting import until_sync

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def _stages() -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_on_slim_python_311() -> None:
    args, stages = _stages()
    assert [s.name for s in stages] == ["builder", "runtime"]
    assert {s.base for s in stages} == {"${PYTHON_IMAGE}"}
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])


def test_builder_installs_the_lock_then_the_wheel_into_a_venv() -> None:
    _, (builder, _) = _stages()
    run = " ".join(builder.all("RUN"))
    assert "python -m venv /opt/venv" in run
    assert "/opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock" in run
    assert "pip wheel --no-deps --wheel-dir /wheels ." in run
    assert "/opt/venv/bin/pip install --no-index --no-deps /wheels/wecombot-*.whl" in run
    assert "/opt/venv/bin/pip check" in run
    copied = {c.split()[0] for c in builder.all("COPY")}
    assert copied == {"requirements.lock", "libs/", "services/"}


@dataclass(frozen=True)
class Locked:
    version: str
    marker: str | None
    hashes: tuple[str, ...]


def _lock() -> dict[str, Locked]:
    """requirements.lock: ``name==version [; marker]`` then its ``--hash`` lines."""
    entries: dict[str, Locked] = {}
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, *hashes = line.split("--hash=")
        requirement = Requirement(spec.strip())
        (pin,) = requirement.specifier
        assert pin.operator == "==", line
        marker = str(requirement.marker) if requirement.marker else None
        digests = tuple(h.strip() for h in hashes)
        entries[canonicalize_name(requirement.name)] = Locked(pin.version, marker, digests)
    return entries


def _applies(requirement: Requirement, extra: str = "") -> bool:
    """Whether it applies to the image: CPython 3.11 on Linux, no extras asked for."""
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"extra": extra, **IMAGE_PLATFORM})


def _unmet(requirements: list[str], lock: dict[str, Locked]) -> list[str]:
    """Those of ``requirements`` that apply to the image and that the lock misses, or
    pins at a version they do not allow."""
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if not _applies(requirement):
            continue
        locked = lock.get(canonicalize_name(requirement.name))
        if locked is None:
            problems.append(f"{requirement.name} is not locked")
        elif not requirement.specifier.contains(locked.version, prereleases=True):
            problems.append(f"{requirement} is wanted, the lock has {locked.version}")
    return problems


IMAGE_PLATFORM = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
    "sys_platform": "linux",
    "os_name": "posix",
    "platform_system": "Linux",
}


def test_the_lock_pins_every_runtime_dependency_within_pyproject_with_hashes() -> None:
    """Every dependency pyproject.toml declares is locked, at a version it allows, each
    with sha256 digests (pip's --require-hashes refuses anything else)."""
    lock = _lock()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _unmet(declared, lock) == [], "pyproject.toml and requirements.lock: make lock"
    for name, locked in lock.items():
        assert locked.hashes and all(h.startswith("sha256:") for h in locked.hashes), name


def test_the_lock_is_closed_and_is_what_the_tests_run() -> None:
    """What each locked distribution needs is locked too (the image's ``pip check``), and
    this environment (``make install`` installs the lock) has exactly the locked
    versions: the tests exercise what the image ships."""
    lock = _lock()
    for name, locked in lock.items():
        if locked.marker is not None and not Marker(locked.marker).evaluate(IMAGE_PLATFORM):
            continue
        installed = importlib.metadata.version(name)
        assert installed == locked.version, (
            f"{name} {installed} is installed, requirements.lock has {locked.version}: "
            "make install (or make lock, to take the new release)"
        )
        assert _unmet(importlib.metadata.requires(name) or [], lock) == [], name


def test_final_stage_is_non_root_with_the_wecombot_entrypoint_and_no_build_tools() -> None:
    _, (_, final) = _stages()
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can verify it
    assert final.all("ENTRYPOINT") == ['["dumb-init", "--", "wecombot"]']
    assert final.all("CMD") == []  # each Deployment passes its subcommand
    assert final.all("COPY") == ["--from=builder /opt/venv /opt/venv"]
    run = " ".join(final.all("RUN"))
    for tool_ in ("apt-get", "apk ", "pip ", "gcc", "build-essential", "make"):
        assert tool_ not in run, tool_
    env = " ".join(final.all("ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env
    # The manifests run as the image's user.
    for overlay in ("dev", "prod"):
        for deployment in of_kind(render(overlay), "Deployment"):
            assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
                uid
            )


def test_exposed_ports_are_the_services_ports() -> None:
    _, (_, final) = _stages()
    exposed = {int(p) for e in final.all("EXPOSE") for p in e.split()}
    ports = {
        p["containerPort"]
        for d in of_kind(render("prod"), "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert exposed == ports == {8080, 8081, 8082, 8083}
    assert len(SERVICES) == len(ports)


# ---------------------------------------------------------------- the build context


def _pattern(rule: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on a path."""
    rule = rule.strip("/")
    out = ""
    i = 0
    while i < len(rule):
        if rule.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif rule.startswith("**", i):
            out += ".*"
            i += 2
        elif rule[i] == "*":
            out += "[^/]*"
            i += 1
        elif rule[i] == "?":
            out += "[^/]"
            i += 1
        elif rule[i] == "[":
            end = rule.index("]", i)
            out += rule[i : end + 1]
            i = end + 1
        else:
            out += re.escape(rule[i])
            i += 1
    return re.compile(out)


def _rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern(line.lstrip("!"))))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent of it decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            included = negate
    return included


def _context_files() -> list[str]:
    rules = _rules()
    negations = [pattern.pattern for negate, pattern in rules if negate]
    files = []
    for top in ROOT.iterdir():
        # Walk only what a rule can let in (not .venv, .git, caches…).
        if not _in_context(top.name, rules) and not any(
            n.startswith(re.escape(top.name)) for n in negations
        ):
            continue
        for path in [top] if top.is_file() else top.rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and _in_context(rel, rules):
                files.append(rel)
    return sorted(files)


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    rules = _rules()
    for path in (
        ".env",
        "libs/.env",
        ".git/config",
        ".venv/bin/python",
        ".wecombot/sandbox.json",
        "tests/conftest.py",
        "deploy/k8s/secrets.example.yaml",
        "docs/deploy.md",
        "libs/common/wecombot_common/__pycache__/bus.cpython-311.pyc",
        "Dockerfile",
    ):
        assert not _in_context(path, rules), path
    for path in (
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "libs/common/wecombot_common/bus.py",
        "services/gateway/wecombot_gateway/main.py",
    ):
        assert _in_context(path, rules), path


def test_the_wheel_builds_from_the_docker_context(tmp_path: Path) -> None:
    """`pip wheel .` in the builder sees only the context: build from a copy of it."""
    context = tmp_path / "context"
    for rel in _context_files():
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", *pip_wheel, "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("wecombot-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    for package in packages:
        top = Path(package).name
        assert f"{top}/__init__.py" in names, top
        sources = {
            p.relative_to(ROOT / package).as_posix()
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert {f"{top}/{s}" for s in sources} <= set(names), top
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "wecombot = wecombot.cli:main" in text
    assert not [n for n in names if "__pycache__" in n or n.endswith(".env")]


def _pid1_refusal() -> str | None:
    """Why a process cannot be started as PID 1 of a PID namespace of its own here."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        return "no /proc/<pid>/task/<tid>/children (a kernel without CONFIG_PROC_CHILDREN)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if probe.returncode == 0 else f"unshare --pid: {probe.stderr.strip()}"


def test_the_entrypoint_as_pid_1_stops_on_a_sigterm_that_comes_while_it_starts(
    tmp_path: Path,
) -> None:
    """In a pod the entrypoint is PID 1, and the kernel drops a signal PID 1 has no
    handler for: `wecombot` alone ignored a SIGTERM that came before the service had set
    its handler (≈ 1 s of imports), and the pod waited out its whole grace period, up to
    35 s. The Dockerfile's ENTRYPOINT, run from this venv as PID 1 of a PID namespace of
    its own and sent SIGTERM as soon as it exists, must end (killed by it, or stopped)."""
    if (refusal := _pid1_refusal()) is not None:
        pytest.skip(refusal)
    _, (_, final) = _stages()
    (entrypoint,) = final.all("ENTRYPOINT")
    command = json.loads(entrypoint)
    bin_dir = Path(sys.executable).parent
    command[0] = str(bin_dir / command[0])  # the image's PATH: its venv's bin first
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "NATS_URL": "nats://127.0.0.1:1",  # nothing there: it waits, until stopped
        "WECOM_CORP_ID": "wwpid1",
        "WECOM_AGENT_ID": "1000002",
        "WECOM_SECRET": "pid-one-secret-0123456789",
        "WECOMBOT_HEALTH_PORT": "0",
    }
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *command, "token"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        until_sync(lambda: bool(children.read_text()), timeout=10, what="PID 1 forked")
        (pid1,) = map(int, children.read_text().split())
        # Signalled before the program has even started, any PID 1 would drop it, and
        # dumb-init's child between its fork and exec too: wait until Python runs
        # (itself PID 1, or dumb-init's child) and has set its first handler (SIGINT's,
        # before any import): the service's own handler comes ≈ 1 s later, so polling
        # every 5 ms finds this window.
        until_sync(lambda: _python_started(pid1), timeout=10, what="Python started", interval=0.005)
        os.kill(pid1, signal.SIGTERM)
        code = unshare.wait(timeout=30)  # ignored, it never ends: the grace's kill
    finally:
        if unshare.poll() is None:
            unshare.kill()  # --kill-child: PID 1 too
            unshare.wait()
    assert code in (0, 128 + signal.SIGTERM), code


def _python_started(pid1: int) -> bool:
    """Whether a process of ``pid1``'s tree (itself or a child) runs Python and catches
    a signal yet."""
    children = Path(f"/proc/{pid1}/task/{pid1}/children").read_text().split()
    for pid in (pid1, *map(int, children)):
        with contextlib.suppress(FileNotFoundError):  # a child that has just ended
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
            if not Path(program.decode()).name.startswith("python"):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
            (caught,) = re.findall(r"^SigCgt:\s*([0-9a-f]+)$", status, flags=re.M)
            if int(caught, 16):
                return True
    return False


def test_entrypoint_lists_every_subcommand_the_manifests_use() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wecombot", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    used = {
        c["args"][0]
        for overlay in ("dev", "prod")
        for d in render(overlay)
        if d["kind"] in ("Deployment", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert used == {*SERVICES, "setup"}
    for command in used:
        assert re.search(rf"^\s+{command}\s", result.stdout, flags=re.M), command
