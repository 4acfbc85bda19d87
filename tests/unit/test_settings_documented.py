"""Every setting the code reads is documented, and every documented one is read.

The settings' names are a public interface: the README's table, `.env.example` and the
Kubernetes ConfigMap (deploy/k8s/base/config.env) must name exactly what the code reads
through :class:`wecombot_common.settings.EnvReader`. The names are found in the source
(each read is ``env.<method>("NAME", …)``), so a new setting cannot go undocumented and
a renamed one cannot leave its old name behind in the docs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from wecombot_common.settings import EnvReader

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


def test_the_configmap_sets_only_settings_the_code_reads(code: set[str]) -> None:
    text = (ROOT / "deploy/k8s/base/config.env").read_text(encoding="utf-8")
    names = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert names, "the ConfigMap sets nothing?"
    assert names - code == set()
