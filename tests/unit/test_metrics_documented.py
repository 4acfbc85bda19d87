"""The metrics docs/deploy.md lists are the ones the services define, and its alerts parse.

Metric names and labels are a public interface (dashboards and alerts are built on
them): the Metrics section must name every metric of :mod:`wecombot_common.metrics` and
no other, and each PromQL example must parse (promql-parser, the Prometheus parser's
Rust port) and use only defined series and their labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from wecombot_common import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy.md"
_SERIES = re.compile(r"(?<![/\w])wecombot_[a-z_]+[a-z](?![/\w.])")  # not a path
_SELECTOR = re.compile(r"\b(wecombot_[a-z_]+[a-z])\{([^}]*)\}")


def defined() -> dict[str, MetricWrapperBase]:
    return {
        name: metric
        for name in metrics.__all__
        if isinstance(metric := getattr(metrics, name), MetricWrapperBase)
    }


def series() -> dict[str, tuple[str, ...]]:
    """Every series name a scrape can show → the label names it may carry."""
    out: dict[str, tuple[str, ...]] = {}
    for metric in defined().values():
        name, labels = metric._name, tuple(metric._labelnames)
        if isinstance(metric, Counter):
            out[f"{name}_total"] = labels
        elif isinstance(metric, Gauge):
            out[name] = labels
        else:
            assert isinstance(metric, Histogram)
            out[name] = labels  # the docs' name for the family
            out.update({f"{name}_{s}": labels for s in ("count", "sum")})
            out[f"{name}_bucket"] = (*labels, "le")
    return out


def primary(metric: MetricWrapperBase) -> str:
    return f"{metric._name}_total" if isinstance(metric, Counter) else metric._name


def metrics_section() -> str:
    text = DEPLOY.read_text(encoding="utf-8")
    start = text.index("\n## Metrics\n")
    return text[start : text.index("\n## ", start + 1)]


def promql_examples() -> list[str]:
    """Each expression of the section's ```promql blocks (comments dropped; indented
    lines continue the expression above)."""
    expressions: list[str] = []
    for block in re.findall(r"```promql\n(.*?)```", metrics_section(), flags=re.S):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and expressions:
                expressions[-1] += " " + line.strip()
            else:
                expressions.append(line.strip())
    return expressions


def test_every_defined_metric_is_documented_and_nothing_else() -> None:
    known = series()
    documented = set(_SERIES.findall(metrics_section()))
    assert documented - set(known) == set(), "documented but not defined"
    assert {primary(m) for m in defined().values()} - documented == set(), "undocumented"


def test_the_examples_are_there() -> None:
    assert len(promql_examples()) >= 5


@pytest.mark.parametrize("expression", promql_examples())
def test_each_alert_example_parses_and_uses_defined_series_and_labels(expression: str) -> None:
    promql_parser.parse(expression)  # raises ValueError on a syntax error
    known = series()
    for name in _SERIES.findall(expression):
        assert name in known, name
    for name, matchers in _SELECTOR.findall(expression):
        used = {m.split("=")[0].rstrip("!~").strip() for m in matchers.split(",") if m.strip()}
        assert used <= set(known[name]), (name, used, known[name])
