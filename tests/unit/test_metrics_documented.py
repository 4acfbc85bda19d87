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
from prometheus_client.metrics import MetricWrapperBase

from wecombot_common import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy.md"
_SERIES = re.compile(r"(?<![/\w])wecombot_[a-z_]+[a-z](?![/\w.])")  # not a path
_SELECTOR = re.compile(r"\b(wecombot_[a-z_]+[a-z])\{([^}]*)\}")
_PROBE = "__docs_probe__"  # a label value no metric ever carries


def defined() -> dict[str, MetricWrapperBase]:
    return {
        name: metric
        for name in metrics.__all__
        if isinstance(metric := getattr(metrics, name), MetricWrapperBase)
    }


def family(metric: MetricWrapperBase) -> tuple[str, str, tuple[str, ...]]:
    """A metric's family name, type and label names, through prometheus_client's public
    collector API only.

    A labelled metric shows its label names only on a child's samples, so one is made
    with placeholder values (as many as ``labels()`` accepts), collected and removed.
    """
    [described] = metric.describe()
    for count in range(1, 16):
        values = [_PROBE] * count
        try:
            metric.labels(*values)
        except ValueError:  # not this many labels, or none at all
            continue
        try:
            [collected] = metric.collect()
        finally:
            metric.remove(*values)
        sample = next(s for s in collected.samples if _PROBE in s.labels.values())
        labels = tuple(name for name, value in sample.labels.items() if value == _PROBE)
        return described.name, described.type, labels
    return described.name, described.type, ()


def series() -> dict[str, tuple[str, ...]]:
    """Every series name a scrape can show → the label names it may carry."""
    out: dict[str, tuple[str, ...]] = {}
    for metric in defined().values():
        name, kind, labels = family(metric)
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "gauge":
            out[name] = labels
        else:
            assert kind == "histogram", (name, kind)
            out[name] = labels  # the docs' name for the family
            out.update({f"{name}_{s}": labels for s in ("count", "sum")})
            out[f"{name}_bucket"] = (*labels, "le")
    return out


def primary(metric: MetricWrapperBase) -> str:
    name, kind, _ = family(metric)
    return f"{name}_total" if kind == "counter" else name


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


@pytest.mark.parametrize(
    "series",
    [
        'wecombot_gateway_refusals_total{reason="AppendUnavailable",status="503"} 0.0',
        'wecombot_gateway_refusals_total{reason="SignatureError",status="403"} 0.0',
        # made by aiohttp's parser and router, or too big for the broker: counted too
        'wecombot_gateway_refusals_total{reason="BadHttpMethod",status="400"} 0.0',
        'wecombot_gateway_refusals_total{reason="HTTPNotFound",status="404"} 0.0',
        'wecombot_gateway_refusals_total{reason="EventTooLarge",status="413"} 0.0',
        'wecombot_llm_outcomes_total{outcome="ReplyFailed"} 0.0',
        'wecombot_token_fetches_total{result="network"} 0.0',
        'wecombot_token_fetches_total{result="untrusted_ip"} 0.0',
    ],
)
def test_the_series_the_alert_examples_watch_exist_at_zero_from_the_start(series: str) -> None:
    """A counter's first sample is the baseline of rate() and increase(): a series made
    by its first increment never shows that one, so the first 503, ReplyFailed or
    gettoken failure after a pod started did not fire the alerts above. Read from a fresh
    process (this one's counters may have counted already)."""
    import subprocess
    import sys

    scrape = subprocess.run(
        [
            sys.executable,
            "-c",
            "import wecombot_gateway.app, wecombot_llm.handler, wecombot_token.keeper\n"
            "from prometheus_client import generate_latest\n"
            "print(generate_latest().decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert series in scrape.stdout.splitlines()
