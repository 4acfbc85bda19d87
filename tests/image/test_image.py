"""The container image, built from the Dockerfile and run: the whole pipeline from it.

tests/deploy checks the Dockerfile's text and builds the wheel from its build context;
this builds the image itself (buildah, :mod:`tests.image.engine`) and runs every
service from it as Kubernetes would: the setup Job's ``wecombot setup``, then token,
llm, sender and gateway, each as the image's own user, against a real nats-server and
the simulated WeCom and model on loopback. A user's message must come back as a reply,
each service must stop cleanly on SIGTERM, and nothing may be written to the image's
filesystem (the manifests mount it read-only).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import NatsHandle
from tests.deploy.conftest import ROOT, SERVICES, of_kind, render
from tests.e2e.harness import ProcessService, Stack
from tests.image.conftest import BASES
from tests.image.engine import Base, Buildah, Container, missing

# The first test also waits for the build (a minute; the stand-in base another on a new
# machine).
pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Built:
    buildah: Buildah
    tag: str
    base: Base


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} — .ci/run installs it, so CI must have it")
    pytest.skip(reason)


def _official_base() -> str:
    """The Dockerfile's default ``PYTHON_IMAGE``."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.partition("=")[2].strip()
    raise AssertionError("the Dockerfile has no ARG PYTHON_IMAGE default")


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    reason = missing()
    if reason is not None:
        _missing(reason)
    buildah = Buildah()
    base = buildah.base(_official_base())
    tag = f"localhost/wecombot-test:{uuid.uuid4().hex[:12]}"
    seconds = buildah.build(ROOT, tag, build_args={"PYTHON_IMAGE": base.image})
    BASES.append(f"{base.description}; the image built in {seconds:.0f} s")
    try:
        yield Built(buildah, tag, base)
    finally:
        buildah.remove_image(tag)


@pytest.fixture
def container(built: Built) -> Iterator[Container]:
    made = built.buildah.container(built.tag)
    try:
        yield made
    finally:
        made.remove()


def test_the_image_runs_as_its_user_with_the_wecombot_entrypoint(
    built: Built, container: Container
) -> None:
    config = built.buildah.config(built.tag)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["dumb-init", "--", "wecombot"]
    assert not config.get("Cmd"), "each Deployment passes its subcommand"
    ports = {int(p.split("/")[0]) for p in config["ExposedPorts"]}
    manifests = {
        p["containerPort"]
        for d in of_kind(render("prod"), "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert ports == manifests
    assert container.run(["id", "-u"]).strip() == "10001", built.base.description
    usage = container.run(["wecombot", "--help"])
    for command in (*SERVICES, "setup"):
        assert f"    {command} " in usage, command
    # No installer or compiler in the runtime stage: pip was removed from the venv.
    tools = container.run(["sh", "-c", "command -v pip pip3 gcc cc make || true"])
    assert "/opt/venv" not in tools and "gcc" not in tools, tools


async def test_every_service_from_the_image_answers_a_user_and_writes_nothing(
    built: Built, container: Container, nats_server: NatsHandle, tmp_path: Path
) -> None:
    await asyncio.to_thread(container.run, ["true"])  # buildah's first-run set-up
    before = await asyncio.to_thread(container.files)

    entrypoint = built.buildah.config(built.tag)["Entrypoint"]  # as Kubernetes runs it

    def launcher(args: Sequence[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        return container.argv([*entrypoint, *args], env), dict(os.environ)

    async with Stack(
        nats_server.url, tmp_path, launcher=launcher, service_pid=_service_in
    ) as stack:
        # The setup Job first, as the manifests order it.
        out = await asyncio.to_thread(container.run, ["wecombot", "setup"], stack.env())
        assert '"setup.done"' in out, out
        for name in ("token", "llm", "sender", "gateway"):
            stack.start_process(name)
        await stack.wait_ready(timeout=60)
        await stack.say("image.user", "hello from the image")
        assert await stack.wait_replies("image.user", 1) == ["echo: hello from the image"]
        assert stack.wecom.gettoken_calls == 1
        while stack.services:
            service = stack.services.pop()
            assert isinstance(service, ProcessService)
            code = await service.terminate()
            assert code == 0, f"{service.name} exited {code}:\n{service.log_path.read_text()}"

    after = await asyncio.to_thread(container.files)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert changed == [], f"written to the image's filesystem: {changed[:20]}"


def _service_in(proc: subprocess.Popen[bytes]) -> int:
    """The entrypoint's process under ``buildah run`` (dumb-init, the container's PID 1
    in a pod: SIGTERM is for it, as Kubernetes sends it there), not buildah's own chroot
    helpers."""
    queue = [proc.pid]
    while queue:
        pid = queue.pop(0)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if argv[0].endswith(b"dumb-init"):
            return pid
        for task in Path(f"/proc/{pid}/task").glob("*"):
            queue.extend(int(c) for c in (task / "children").read_text().split())
    raise AssertionError(f"no dumb-init process under buildah ({proc.pid})")
