"""Build and run the project's Dockerfile without a Docker engine: buildah.

buildah reads the same Dockerfile and builds the same OCI image; ``chroot`` isolation and
``vfs`` storage need root but no daemon, no user namespaces and no overlay filesystem.
``buildah run`` then runs a command in a working container of the image, as the image's
user, with the host's network (loopback included), which is how the tests reach it.

The base image: the Dockerfile's ``PYTHON_IMAGE`` (``python:3.11-slim-bookworm``) comes
from Docker Hub. Where Docker Hub cannot be reached (this machine reaches PyPI and
Debian only), a stand-in is built once with debootstrap: Debian bookworm with its
Python 3.11, venv and pip, the distribution the official slim image is built on. The
test run's summary says which base was used (:attr:`Base.description`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STANDIN = "localhost/wecombot-test-base:bookworm-python3.11"
_DEBIAN_MIRROR = "http://deb.debian.org/debian"
_STANDIN_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing() -> str | None:
    """Why images cannot be built here (None: they can)."""
    absent = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "buildah with chroot isolation and vfs storage needs root"
    return None


def _registry_reachable(host: str = "registry-1.docker.io", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Base:
    image: str
    description: str


@dataclass(frozen=True)
class Container:
    """A working container of an image: each :meth:`argv` runs one process in it."""

    buildah: Buildah
    name: str

    def argv(self, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """``buildah run`` of ``args``: the image's environment plus ``env``, nothing of the
        host's."""
        flags = [f"--env={key}={value}" for key, value in env.items()]
        return [*self.buildah.cmd, "run", "--isolation", "chroot", *flags, self.name, "--", *args]

    def run(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Run ``args`` to completion; its output (stdout and stderr). Fails on non-zero."""
        result = subprocess.run(
            self.argv(args, env or {}), capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout + result.stderr

    def files(self) -> dict[str, tuple[int, int]]:
        """Every regular file and symlink of the container's root: path → (size, mtime)."""
        root = Path(self.buildah.out("mount", self.name))
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            if rel in ("proc", "sys", "dev", "run"):
                dirnames.clear()
                continue
            for name in filenames:
                path = Path(dirpath, name)
                stat = path.lstat()
                out[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return out

    def remove(self) -> None:
        self.buildah.out("rm", self.name)


class Buildah:
    """The ``buildah`` command line, with one storage driver for every call."""

    def __init__(self) -> None:
        self.cmd = ["buildah", "--storage-driver", "vfs"]

    def out(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def exists(self, image: str) -> bool:
        return (
            subprocess.run(
                [*self.cmd, "inspect", "--type", "image", image], capture_output=True
            ).returncode
            == 0
        )

    def base(self, official: str) -> Base:
        """``official`` when Docker Hub can be reached, else the Debian stand-in."""
        unreachable = "Docker Hub unreachable"
        if _registry_reachable():
            try:
                self.out("pull", "--quiet", official)
                return Base(official, f"{official} (pulled)")
            except RuntimeError as exc:
                unreachable = f"pulling {official} failed ({exc})"
        if not self.exists(STANDIN):
            self._build_standin()
        probe = self.container(STANDIN)
        try:
            python = probe.run(["python", "-V"]).strip()
        finally:
            probe.remove()
        return Base(
            STANDIN,
            f"{unreachable}: {official} stood in for by Debian bookworm (debootstrap minbase"
            f" + python3, venv, pip: {python})",
        )

    def _build_standin(self) -> None:
        with tempfile.TemporaryDirectory(prefix="wecombot-base-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={_STANDIN_PACKAGES}",
                 "bookworm", str(rootfs), _DEBIAN_MIRROR],
                check=True, capture_output=True, timeout=900,
            )  # fmt: skip
            container = self.out("from", "scratch")
            try:
                mount = Path(self.out("mount", container))
                subprocess.run(["cp", "-a", f"{rootfs}/.", str(mount)], check=True)
                self.out(
                    "config",
                    "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env", "LANG=C.UTF-8",
                    "--cmd", "python3",
                    container,
                )  # fmt: skip
                self.out("commit", "--quiet", container, STANDIN)
            finally:
                self.out("rm", container)

    def build(self, context: Path, tag: str, *, build_args: Mapping[str, str]) -> float:
        """``buildah bud`` (``docker build``) of ``context``'s Dockerfile; the seconds taken."""
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        # Build steps reach PyPI through the host's network and trust its CA bundle.
        volumes = [f"--volume={_CA_BUNDLE}:{_CA_BUNDLE}:ro"] if _CA_BUNDLE.is_file() else []
        started = time.monotonic()
        result = subprocess.run(
            [*self.cmd, "bud", "--isolation", "chroot", "--network", "host", "--layers=false",
             *volumes, *args, "--tag", tag, str(context)],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"the image did not build:\n{result.stdout}{result.stderr}")
        return time.monotonic() - started

    def config(self, image: str) -> dict[str, Any]:
        """The image's OCI config: User, Entrypoint, Cmd, ExposedPorts, Env…"""
        config: dict[str, Any] = json.loads(self.out("inspect", "--type", "image", image))["OCIv1"][
            "config"
        ]
        return config

    def container(self, image: str) -> Container:
        return Container(self, self.out("from", image))

    def remove_image(self, image: str) -> None:
        subprocess.run([*self.cmd, "rmi", "--force", image], capture_output=True)
