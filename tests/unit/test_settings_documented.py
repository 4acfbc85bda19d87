"""Every setting the code reads is documented, and every documented one is read, with
the default, the services and the bounds the code has.

The settings' names are a public interface: the README's table, `.env.example` and the
Kubernetes ConfigMap (deploy/k8s/base/config.env) must name exactly what the code reads
through :class:`wecombot_common.settings.EnvReader`. The names are found in the source
(each read is ``env.<method>("NAME", …)``), so a new setting cannot go undocumented and
a renamed one cannot leave its old name behind in the docs.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from tests.unit.test_settings import GOOD
from wecombot import dev
from wecombot_common.runtime import event_loop_name
from wecombot_common.settings import EnvReader, data_dir
from wecombot_gateway.settings import GatewaySettings
from wecombot_llm.settings import LlmSettings
from wecombot_sender.settings import SenderSettings
from wecombot_token.settings import TokenSettings

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "libs", ROOT / "services"]
_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")
# The reader's methods that take a variable's name first.
_READS = frozenset(
    name
    for name in vars(EnvReader)
    if not name.startswith("_") and name not in ("check", "raise_if_invalid")
)
# Read with the settings of the llm, sender and token (wecombot_common.proxy, httpx's
# rules); documented in .env.example and docs/providers.md.
PROXIES = frozenset(("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"))


def read_by_the_code() -> set[str]:
    names: set[str] = set()
    for source in SOURCES:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _READS
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and _NAME.fullmatch(node.args[0].value)
                ):
                    names.add(node.args[0].value)
    return names


def in_env_example() -> set[str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))


def in_readme_table() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


@pytest.fixture(scope="module")
def code() -> set[str]:
    names = read_by_the_code()
    assert len(names) > 40, f"the scan found only {sorted(names)}: is it still finding reads?"
    return names


def test_every_setting_read_is_in_env_example(code: set[str]) -> None:
    assert code - in_env_example() == set()


def test_env_example_names_only_settings_the_code_reads(code: set[str]) -> None:
    assert in_env_example() - code - PROXIES == set()


def test_every_setting_read_is_in_the_readme_table(code: set[str]) -> None:
    assert code - in_readme_table() == set()


def test_the_readme_table_names_only_settings_the_code_reads(code: set[str]) -> None:
    assert in_readme_table() - code == set()


@pytest.mark.parametrize(
    "path",
    [
        "deploy/k8s/base/config.env",
        "deploy/k8s/overlays/dev/app.env",
        "deploy/k8s/overlays/prod/app.env",
        # the overlays' configMapGenerator literals (- NAME=value)
        "deploy/k8s/overlays/dev/kustomization.yaml",
        "deploy/k8s/overlays/prod/kustomization.yaml",
    ],
)
def test_the_configmap_sets_only_settings_the_code_reads(code: set[str], path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    names = set(re.findall(r"^(?: *- )?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert names, "the ConfigMap sets nothing?"
    assert names - code == set()


# ---------------------------------------------------------------- what each setting is
#
# The names alone do not make the table true: its default and "used by" columns, the
# values .env.example sets and a bound the table states must be what the code does. Each
# service's settings are read (with a recording EnvReader) to learn, per variable, the
# default each service falls back to and the bounds it checks.

SERVICES: dict[str, Callable[[Mapping[str, str]], object]] = {
    "gateway": GatewaySettings.from_env,
    "llm": LlmSettings.from_env,
    "sender": SenderSettings.from_env,
    "token": TokenSettings.from_env,
}
# Defaults of the commands' own settings, which no service reads (wecombot dev, doctor).
COMMAND_DEFAULTS: dict[str, object] = {
    "WECOMBOT_CONSOLE_PORT": dev.CONSOLE_PORT,  # a reader default of 0 stands for "unset"
    "WECOMBOT_PUBLIC_URL": None,
}
# Read by a service that does nothing with it but redact it from its logs: the sender
# shares the token service's WeComApiSettings, and never needs the app's Secret (tokens
# come from the token service).
UNUSED_READS = {"WECOM_SECRET": {"sender"}}
UNSET = None  # no default: read only when set (an optional value, a secret not required)
REQUIRED = "required"


@dataclass
class Read:
    """What the services do with one variable: its default in each, and its bounds."""

    defaults: dict[str, object] = field(default_factory=dict)  # service → default
    minimum: float | None = None
    maximum: float | None = None


def read_by_each_service() -> dict[str, Read]:
    reads: dict[str, Read] = {}
    service = ""

    def record(
        name: str, default: object, minimum: float | None = None, maximum: float | None = None
    ) -> None:
        read = reads.setdefault(name, Read())
        read.defaults.setdefault(service, default)
        if minimum is not None or maximum is not None:
            read.minimum, read.maximum = minimum, maximum

    def number(
        self: EnvReader,
        name: str,
        default: object,
        parse: object,
        what: str,
        minimum: float | None,
        maximum: float | None,
    ) -> object:
        record(name, default, minimum, maximum=maximum)
        return original["number"](self, name, default, parse, what, minimum, maximum)

    def with_default(method: str) -> Callable[..., object]:
        def read(
            self: EnvReader, name: str, default: object = None, *args: object, **kwargs: object
        ) -> object:
            record(name, REQUIRED if default is None else default)
            return original[method](self, name, default, *args, **kwargs)

        return read

    def without_default(method: str) -> Callable[..., object]:
        def read(self: EnvReader, name: str, *args: object, **kwargs: object) -> object:
            required = method == "secret" and kwargs.get("required", True)
            record(name, REQUIRED if required else UNSET)
            return original[method](self, name, *args, **kwargs)

        return read

    original = {m: getattr(EnvReader, m) for m in _READS}
    replaced = {
        "number": number,
        "text": with_default("text"),
        "choice": with_default("choice"),
        "url": with_default("url"),
        "optional": without_default("optional"),
        "secret": without_default("secret"),
        "present": without_default("present"),
    }
    assert set(replaced) == set(original) - {"integer", "seconds", "proxy_for"}, (
        "EnvReader has a new kind of read: record it here"
    )
    with contextlib.ExitStack() as stack:
        for method, wrapper in replaced.items():
            stack.enter_context(mock.patch.object(EnvReader, method, wrapper))
        for service, from_env in SERVICES.items():  # noqa: B007 (record() reads it)
            from_env(GOOD)
            event_loop_name(GOOD)  # runtime.run_service reads it for every service
        service = "dev"
        data_dir(EnvReader({}))
    return reads


@pytest.fixture(scope="module")
def reads() -> dict[str, Read]:
    return read_by_each_service()


def readme_rows() -> dict[str, tuple[int, str, str, str]]:
    """variable → (its place in the row's names, default cell, used-by cell, meaning)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[int, str, str, str]] = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
            for i, name in enumerate(names):
                rows[name] = (i, cells[1], cells[2], cells[3])
    return rows


def shown(value: object) -> str:
    """A default as the docs write it: 60.0 as 60, 0.05 as 0.05."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def worth_quoting(value: object) -> bool:
    """A default short enough to write in the table (not a whole prompt or apology)."""
    text = shown(value)
    return value not in (UNSET, REQUIRED) and len(text) <= 40 and text.isascii() and " " not in text


def documented_default(code: dict[str, object], place: int, cell: str) -> object:
    """What the table's default cell says the code does, for the variable in ``place``."""
    if len(set(map(shown, code.values()))) > 1:  # one per service: "llm 8081, sender 8082"
        return {s: v for s, v in re.findall(r"\b([a-z]+) (\S+?)(?:,|$)", cell)}
    if cell.startswith("—"):
        return REQUIRED
    if cell.startswith("unset"):
        return UNSET
    # "`30` / `10`" for "`LLM_ACK_WAIT` / `LLM_MAX_DELIVER`"; words in brackets follow
    quoted = re.findall(r"`([^`]*)`", cell.split(" (")[0])
    assert len(quoted) > place, f"default cell {cell!r}: neither —, unset nor a `value`"
    return quoted[place]


def test_the_readme_table_gives_each_default_the_code_falls_back_to(
    reads: dict[str, Read],
) -> None:
    rows = readme_rows()
    wrong: list[str] = []
    code_defaults = {name: read.defaults for name, read in reads.items()}
    code_defaults |= {name: {"dev": value} for name, value in COMMAND_DEFAULTS.items()}
    for name, defaults in sorted(code_defaults.items()):
        place, cell, _, _ = rows[name]
        if REQUIRED in defaults.values():
            defaults = {"any": REQUIRED}  # required by one service: no default to give
        values = set(map(shown, defaults.values()))
        if len(values) > 1:
            expected: object = {s: shown(v) for s, v in defaults.items()}
        else:
            value = next(iter(defaults.values()))
            if not worth_quoting(value) and value not in (UNSET, REQUIRED):
                continue  # a text: its cell says what it is in words
            expected = value if value in (UNSET, REQUIRED) else shown(value)
        said = documented_default(defaults, place, cell)
        if said != expected:
            wrong.append(f"{name}: the table says {said!r}, the code {expected!r}")
    assert wrong == []


def test_env_example_sets_each_setting_to_its_default(reads: dict[str, Read]) -> None:
    """A value written in .env.example is the default (a copied .env changes nothing
    by it); one commented out too (``# NATS_URL=…``: "Default for services")."""
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    wrong: list[str] = []
    for name, value in re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=(\S*)", text, flags=re.MULTILINE):
        read = reads.get(name)
        if not value or read is None or len(set(map(shown, read.defaults.values()))) != 1:
            continue  # empty: the default; not a service's; a default per service
        [default] = set(map(shown, read.defaults.values()))
        if value != default:
            wrong.append(f"{name}={value}, but the code's default is {default}")
    assert wrong == []


def test_the_readme_table_says_which_services_read_each_setting(
    reads: dict[str, Read],
) -> None:
    rows = readme_rows()
    wrong: list[str] = []
    for name, read in sorted(reads.items()):
        _, _, cell, _ = rows[name]
        said = set(SERVICES) if cell == "all" else set(re.findall(r"\b[a-z]+\b", cell))
        readers = set(read.defaults) & set(SERVICES) - UNUSED_READS.get(name, set())
        if said & set(SERVICES) != readers:
            wrong.append(f"{name}: the table says {cell!r}, read by {sorted(readers)}")
    assert wrong == []


def test_a_bound_the_readme_table_states_is_the_one_the_code_checks(
    reads: dict[str, Read],
) -> None:
    rows = readme_rows()
    wrong: list[str] = []
    for name, read in sorted(reads.items()):
        _, _, _, meaning = rows[name]
        for most in re.findall(r"\bat most (\d+(?:\.\d+)?)\b", meaning):
            if read.maximum is None or float(most) != read.maximum:
                wrong.append(f"{name}: the table says at most {most}, the code {read.maximum}")
        if re.search(r"\b0 = off\b|\b0: every\b", meaning) and read.minimum != 0:
            wrong.append(
                f"{name}: the table says 0 turns it off, the code's minimum {read.minimum}"
            )
    assert wrong == []
