"""The Kubernetes manifests, offline: render each kustomize overlay for real (kubectl's
kustomize), validate every object against the Kubernetes OpenAPI schemas
(kubernetes-validate, bundled, strict), the KEDA ScaledObjects against the schema kept in
deploy/k8s/schemas and against KEDA's own API types (@kubernetes-models/keda), lint every
YAML file (yamllint), check the PodMonitor the docs show, then check what the schemas
cannot: probes on the ports the services serve, grace periods longer than the in-app
grace, one NATS user per service, what each pod may reach, consistent names across the
manifests, the Helm values, the NATS authorization and the Secret template.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from nats.aio.client import DEFAULT_FLUSH_TIMEOUT

from tests.deploy.conftest import (
    DEPLOY,
    K8S,
    NAMESPACE,
    NATS_DIR,
    OVERLAYS,
    ROOT,
    SERVICES,
    load_all_yaml,
    load_yaml,
    of_kind,
    one,
    render,
    tool,
)
from tests.unit.test_metrics_documented import promql_examples
from wecombot_common import bus, topology
from wecombot_common.worker import PullWorker

# The oldest Kubernetes we support (matchLabelKeys in topology spread: beta since 1.27)
# and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject-v1alpha1.schema.json"
MODELS = Path(__file__).parent / "models"  # npm: @kubernetes-models (make install)
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
AUTH_CONF = NATS_DIR / "auth.conf"
SECRET_TEMPLATE = K8S / "secrets.example.yaml"
MONITORING = K8S / "components" / "monitoring"


def _nats_drain_s() -> int:
    """Seconds bus.disconnect may take: nats-py's drain gives the subscriptions
    bus.connect's drain_timeout, then flushes what is buffered (its default flush
    timeout); to a broker that hangs, both run out."""
    found = re.search(r'"drain_timeout": (\d+)', inspect.getsource(bus.connect))
    assert found is not None, "bus.connect sets no drain_timeout"
    return int(found[1]) + DEFAULT_FLUSH_TIMEOUT


NATS_DRAIN_S = _nats_drain_s()
FETCH_EXPIRY_S = 1  # PullWorker(fetch_timeout_s=1.0): the last pull request expires
NATS_POD = {
    "app.kubernetes.io/name": "nats",
    "app.kubernetes.io/instance": "nats",
    "app.kubernetes.io/component": "nats",
}
NATS_BOX_POD = {**NATS_POD, "app.kubernetes.io/component": "nats-box"}
PUBLIC_IP = "203.0.113.10"  # documentation range: "somewhere on the internet"
PUBLIC_IPV6 = "2606:4700:4700::1111"

EXPECTED_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "Job",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ScaledObject",
    "Ingress",
    "NetworkPolicy",
}


# ---------------------------------------------------------------- schemas and lint


def test_overlays_render_the_expected_objects(docs: list[dict[str, Any]]) -> None:
    assert {d["kind"] for d in docs} == EXPECTED_KINDS
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert deployments == {f"wecombot-{s}" for s in SERVICES}
    assert {d["metadata"]["namespace"] for d in docs} == {NAMESPACE}
    # A real Secret is never part of the manifests (secrets.example.yaml is a template).
    assert not of_kind(docs, "Secret")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(docs: list[dict[str, Any]], version: str) -> None:
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against its own schema below
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == len(docs) - 2


def test_scaled_objects_match_the_keda_schema(docs: list[dict[str, Any]]) -> None:
    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    scaled = of_kind(docs, "ScaledObject")
    assert len(scaled) == 2
    for doc in scaled:
        validator.validate(doc)
        spec = doc["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda so: so["spec"]["triggers"][0]["metadata"].pop("consumer"), "no consumer"),
        (
            lambda so: so["spec"]["triggers"][0]["metadata"].update(lagTreshold="10"),
            "a misspelt metadata key",
        ),
        (
            lambda so: so["spec"]["triggers"][0]["metadata"].update(lagThreshold=10),
            "metadata values are strings",
        ),
        (lambda so: so["spec"].update(minReplicas=1), "an HPA field on a ScaledObject"),
        (lambda so: so["spec"]["scaleTargetRef"].pop("name"), "no target"),
        (
            lambda so: so["spec"]["triggers"][0]["metadata"].update(
                natsServerMonitoringEndpoint="http://nats:8222"
            ),
            "the endpoint is host:port, no scheme",
        ),
    ],
)
def test_the_keda_schema_catches_mistakes(mutate: Any, why: str) -> None:
    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    scaled = json.loads(json.dumps(one(render("prod"), "ScaledObject", "wecombot-llm")))
    mutate(scaled)
    assert list(validator.iter_errors(scaled)), why


def _model_errors(objects: list[dict[str, Any]]) -> list[str | None]:
    """Each custom resource checked by @kubernetes-models (tests/deploy/models)."""
    node = shutil.which("node")
    if node is None or not (MODELS / "node_modules").is_dir():
        reason = "node or its packages missing: run `npm ci --prefix tests/deploy/models`"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} — CI must have them")
        pytest.skip(reason)
    result = subprocess.run(
        [node, str(MODELS / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    errors: list[str | None] = json.loads(result.stdout)
    return errors


def test_scaled_objects_match_kedas_own_api_types(docs: list[dict[str, Any]]) -> None:
    """The schema above is ours (stricter: unknown keys fail); this is KEDA's own Go API
    types, as @kubernetes-models/keda generates validators from them."""
    scaled = of_kind(docs, "ScaledObject")
    wrong = json.loads(json.dumps(scaled[0]))
    wrong["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 10  # KEDA wants strings
    *ours, control = _model_errors([*scaled, wrong])
    assert ours == [None] * len(scaled), ours
    assert control is not None and "lagThreshold must be string" in control


def _documented(kind: str) -> dict[str, Any]:
    """The object of ``kind`` shown in a yaml block of docs/deploy.md."""
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.S)
    found = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]
    (doc,) = [d for d in found if d.get("kind") == kind]
    assert isinstance(doc, dict)
    return doc


def _with_monitoring(overlay: str, root: Path) -> list[dict[str, Any]]:
    """``overlay`` with the monitoring component, as docs/deploy.md says to opt in
    (kustomize takes only relative paths)."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, root)],
        "components": [os.path.relpath(MONITORING, root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(root)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_the_monitoring_component_ships_the_documented_monitor_and_alerts(
    overlay: str, tmp_path: Path
) -> None:
    """The PodMonitor and the alerts were only shown in docs/deploy.md, for each team to
    copy into manifests of its own: now a component an overlay opts into."""
    docs = _with_monitoring(overlay, tmp_path)
    added = [d for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(map(_key, added)) == [("PodMonitor", "wecombot"), ("PrometheusRule", "wecombot")]
    rest = sorted((d for d in docs if d not in added), key=_key)
    assert rest == sorted(render(overlay), key=_key), "the component changes nothing else"
    assert {d["metadata"]["namespace"] for d in added} == {NAMESPACE}
    monitor, rule = one(added, "PodMonitor", "wecombot"), one(added, "PrometheusRule", "wecombot")
    assert monitor == _documented("PodMonitor")

    wrong = json.loads(json.dumps(rule))
    wrong["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"  # a Prometheus duration
    assert _model_errors([rule, wrong]) == [
        None,
        "data/spec/groups/0/rules/0/for must match pattern "
        '"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"',
    ]
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    # The docs' alerts, each parsed and held to the series the services export
    # (tests/unit/test_metrics_documented.py), are the rule's, in its order.
    assert [" ".join(r["expr"].split()) for r in rules] == [
        " ".join(e.split()) for e in promql_examples()
    ]
    assert len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        assert re.fullmatch(r"Wecombot[A-Z][A-Za-z]+", r["alert"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r
        assert r["annotations"].keys() == {"summary", "description"}, r


def test_the_documented_pod_monitor_scrapes_each_service_once() -> None:
    monitor = _documented("PodMonitor")
    wrong = json.loads(json.dumps(monitor))
    wrong["spec"]["podMetricsEndpoints"][0]["port"] = 8080  # a port *name* is wanted
    ok, control = _model_errors([monitor, wrong])
    assert ok is None, ok
    assert control is not None and "port must be string" in control
    assert monitor["metadata"]["namespace"] == NAMESPACE
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    endpoints = {
        e["port"]: e.get("path", "/metrics") for e in monitor["spec"]["podMetricsEndpoints"]
    }
    for deployment in of_kind(render("prod"), "Deployment"):
        template = deployment["spec"]["template"]
        assert selector <= template["metadata"]["labels"].items()
        named = {
            p["name"]: p["containerPort"]
            for c in template["spec"]["containers"]
            for p in c["ports"]
            if "name" in p
        }
        (port,) = endpoints.keys() & named.keys()  # one endpoint per pod: no double scrape
        annotations = template["metadata"]["annotations"]
        assert named[port] == int(annotations["prometheus.io/port"])
        assert endpoints[port] == annotations["prometheus.io/path"] == "/metrics"


def test_yamllint_is_clean() -> None:
    files = sorted(
        str(p) for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
    )
    assert len(files) >= 15
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-c",
            str(DEPLOY / ".yamllint.yaml"),
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_secret_template_is_valid_and_holds_no_secret() -> None:
    secrets_ = load_all_yaml(SECRET_TEMPLATE)
    assert {s["metadata"]["name"] for s in secrets_} == {"wecombot-nats", "wecombot-secrets"}
    for secret in secrets_:
        kubernetes_validate.validate(secret, KUBE_VERSIONS[-1], strict=True)
        assert "data" not in secret
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}


# ---------------------------------------------------------------- the services' pods


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = [
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("wecombot-config")
    ]
    assert len(maps) == 1
    return dict(maps[0]["data"])


def _literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


SECRETS_OF = {
    "gateway": {"NATS_PASSWORD", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY"},
    "llm": {"NATS_PASSWORD", "OPENAI_API_KEY"},
    "sender": {"NATS_PASSWORD"},
    "token": {"NATS_PASSWORD", "WECOM_SECRET"},
}


def _service_env(docs: list[dict[str, Any]], service: str) -> dict[str, str]:
    """The environment a pod of ``service`` gets, with made-up values for its secrets."""
    container = _container(one(docs, "Deployment", f"wecombot-{service}"))
    fake = {
        "NATS_PASSWORD": "p" + "0" * 48,
        "WECOM_TOKEN": "Token123",
        "WECOM_ENCODING_AES_KEY": "a" * 43,
        "WECOM_SECRET": "secret",
        "OPENAI_API_KEY": "sk-test",
    }
    env = {**_config(docs), **_literal_env(container)}
    env.update({name: fake[name] for name in _secret_refs(container)})
    return env


def _settings(service: str, env: Mapping[str, str]) -> Any:
    from tests.e2e import harness

    load, _ = harness.service(service)
    return load(env)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_starts_as_itself_with_its_own_nats_user(
    docs: list[dict[str, Any]], service: str
) -> None:
    container = _container(one(docs, "Deployment", f"wecombot-{service}"))
    assert container["image"].startswith("registry.example.com/wecombot:")
    assert container["args"] == [service]
    assert "command" not in container  # the image's entrypoint is `wecombot`
    assert _literal_env(container)["NATS_USER"] == service
    refs = _secret_refs(container)
    assert refs["NATS_PASSWORD"] == ("wecombot-nats", service)
    # Only the secrets this service needs, each from the Secret that holds it.
    assert set(refs) == SECRETS_OF[service]
    for name, (secret, key) in refs.items():
        if name != "NATS_PASSWORD":
            assert (secret, key) == ("wecombot-secrets", name)
    # And the settings are complete and valid for the service (ConfigError otherwise).
    _settings(service, _service_env(docs, service))


def test_only_the_model_key_may_be_missing_and_the_llm_then_names_it(
    docs: list[dict[str, Any]],
) -> None:
    """A Secret without OPENAI_API_KEY: kubelet refused to start the container
    (CreateContainerConfigError, not naming the key), where the docs promised the llm's
    exit 2 naming it. Every other secret is required: its pod does not start without it."""
    from wecombot_common.errors import ConfigError

    optional = {
        service: {
            e["name"]
            for e in _container(one(docs, "Deployment", f"wecombot-{service}")).get("env", [])
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("optional")
        }
        for service in SERVICES
    }
    assert optional == {s: ({"OPENAI_API_KEY"} if s == "llm" else set()) for s in SERVICES}
    env = _service_env(docs, "llm")
    del env["OPENAI_API_KEY"]
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        _settings("llm", env)


@pytest.mark.parametrize("service", SERVICES)
def test_probes_hit_the_health_server_of_the_service(
    docs: list[dict[str, Any]], service: str
) -> None:
    container = _container(one(docs, "Deployment", f"wecombot-{service}"))
    settings = _settings(service, _service_env(docs, service))
    port = settings.port if service == "gateway" else settings.health_port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = one(docs, "Deployment", f"wecombot-{service}")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        str(port),
        "/metrics",
    )
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert named[get["port"]] == port
        assert container[probe]["timeoutSeconds"] >= 2  # /readyz waits up to 1 s for NATS


def _in_app_grace(service: str, settings: Any) -> float:
    """Seconds a pod needs from SIGTERM to exit, as the code behaves."""
    if service == "gateway":
        return 5 + settings.publish_timeout_s + 1 + NATS_DRAIN_S  # preStop sleep 5
    if service == "llm":
        return float(settings.shutdown_grace_s) + FETCH_EXPIRY_S + NATS_DRAIN_S
    if service == "sender":
        grace = inspect.signature(PullWorker.__init__).parameters["grace_s"].default
        return float(grace) + FETCH_EXPIRY_S + NATS_DRAIN_S
    return float(settings.refresh_timeout_s) + NATS_DRAIN_S


@pytest.mark.parametrize("service", SERVICES)
def test_pods_are_given_longer_than_their_graceful_shutdown(
    docs: list[dict[str, Any]], service: str
) -> None:
    pod = one(docs, "Deployment", f"wecombot-{service}")["spec"]["template"]["spec"]
    settings = _settings(service, _service_env(docs, service))
    needed = _in_app_grace(service, settings)
    assert pod["terminationGracePeriodSeconds"] > needed
    if service == "gateway":
        assert _container({"spec": {"template": {"spec": pod}}})["lifecycle"]["preStop"]["exec"][
            "command"
        ] == ["sleep", "5"]


@pytest.mark.parametrize("service", SERVICES)
def test_pods_are_hardened_sized_spread_and_budgeted(
    docs: list[dict[str, Any]], service: str
) -> None:
    deployment = one(docs, "Deployment", f"wecombot-{service}")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == selector
    pdb = one(docs, "PodDisruptionBudget", f"wecombot-{service}")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1  # never blocks a drain, even at 1 replica
    # ... nor with every pod unready (NATS away): unready pods may always be evicted.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_documented_dlq_pod_is_hardened_as_the_services_are(
    docs: list[dict[str, Any]],
) -> None:
    """docs/deploy.md's ``kubectl run wecombot-dlq`` pod set no securityContext: a
    namespace enforcing the ``restricted`` Pod Security Standard refused it, and it ran
    with a writable root and privilege escalation allowed where the services do not."""
    (overrides,) = re.findall(r"--overrides='(.*?)'\n```", DEPLOY_DOC.read_text(), flags=re.S)
    spec = json.loads(overrides.replace("'\"$IMAGE\"'", "registry.example.com/wecombot:0.1.0"))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "wecombot-dlq"}, **spec}
    kubernetes_validate.validate(pod, KUBE_VERSIONS[-1], strict=True)
    (container,) = pod["spec"]["containers"]
    service = one(docs, "Deployment", "wecombot-llm")
    service_pod = service["spec"]["template"]["spec"]
    assert container["securityContext"] == _container(service)["securityContext"]
    expected = {k: v for k, v in service_pod["securityContext"].items() if k != "fsGroup"}
    assert pod["spec"]["securityContext"] == expected  # no volume: fsGroup is moot
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert container["args"] == ["dlq"]


def test_setup_job_runs_wecombot_setup_as_the_setup_user(docs: list[dict[str, Any]]) -> None:
    job = one(docs, "Job", "wecombot-setup")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["setup"]
    assert _literal_env(container)["NATS_USER"] == "setup"
    assert _secret_refs(container) == {"NATS_PASSWORD": ("wecombot-nats", "setup")}
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # gone after a while: re-runs on apply
    # Exit 2 (a setting no retry mends) fails the Job at once, its pod and log kept:
    # restarted in place (OnFailure), the pod went with its log when the Job failed.
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": "setup", "operator": "In", "values": [2]}
    from wecombot.setup import SetupSettings

    env = {**_config(docs), **_literal_env(container), "NATS_PASSWORD": "p0"}
    assert SetupSettings.from_env(env).nats.user == "setup"


# ---------------------------------------------------------------- scaling


def _monitor_port() -> int:
    return int(load_yaml(NATS_DIR / "values.yaml")["config"]["monitor"]["port"])


def test_keda_scales_llm_and_sender_on_their_consumers_lag(docs: list[dict[str, Any]]) -> None:
    consumers = {"llm": topology.LLM_CONSUMER, "sender": topology.SENDER_CONSUMER}
    for service, consumer in consumers.items():
        scaled = one(docs, "ScaledObject", f"wecombot-{service}")
        assert scaled["spec"]["scaleTargetRef"]["name"] == f"wecombot-{service}"
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == topology.CONVERSATION_STREAM
        assert meta["consumer"] == consumer
        assert meta["account"] == "$G"  # no NATS accounts: the global account
        # The chart's headless Service of release `nats`, in this namespace.
        assert meta["natsServerMonitoringEndpoint"] == (
            f"nats-headless.{NAMESPACE}.svc.cluster.local:{_monitor_port()}"
        )
        assert int(meta["lagThreshold"]) > 0
        # KEDA owns these replicas: no fixed count, no second autoscaler.
        assert "replicas" not in one(docs, "Deployment", f"wecombot-{service}")["spec"]
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == ["wecombot-gateway"]
    (metric,) = hpas[0]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in one(docs, "Deployment", "wecombot-gateway")["spec"]


def test_llm_lag_threshold_fits_a_replicas_concurrency(docs: list[dict[str, Any]]) -> None:
    settings = _settings("llm", _service_env(docs, "llm"))
    meta = one(docs, "ScaledObject", "wecombot-llm")["spec"]["triggers"][0]["metadata"]
    assert int(meta["lagThreshold"]) <= settings.max_concurrency


def test_stream_replicas_match_the_nats_cluster() -> None:
    base = load_yaml(NATS_DIR / "values.yaml")
    for overlay, values_file, replicas in (
        ("dev", "values-dev.yaml", 1),
        ("prod", "values-prod.yaml", 3),
    ):
        config = _config(render(overlay))
        assert config["WECOMBOT_STREAM_REPLICAS"] == str(replicas)
        cluster = load_yaml(NATS_DIR / values_file)["config"]["cluster"]
        servers = cluster["replicas"] if cluster["enabled"] else 1
        assert servers == replicas
    assert base["config"]["jetstream"]["enabled"] is True
    assert base["config"]["jetstream"]["fileStore"]["enabled"] is True
    assert base["config"]["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert base["config"]["monitor"] == {"enabled": True, "port": 8222}


def test_the_history_cap_fits_the_nats_volume() -> None:
    """WECOMBOT_HISTORY_MAX_MB is reserved in each server's JetStream store: the volume's
    size under recent NATS charts, nats-server's default 75 % of its free space (measured)
    under older ones. A cap above it is refused (setup exits 2), one near it leaves no
    room for the dead letters and the token bucket. Each overlay's cap stays within 60 %
    of its NATS volume, so it fits either way."""
    base = load_yaml(NATS_DIR / "values.yaml")["config"]["jetstream"]["fileStore"]["pvc"]
    for overlay, values_file in (("dev", "values-dev.yaml"), ("prod", "values-prod.yaml")):
        pvc = load_yaml(NATS_DIR / values_file)["config"]["jetstream"]["fileStore"]["pvc"]
        size = pvc.get("size", base["size"])
        assert size.endswith("Gi"), size
        cap_mib = int(_config(render(overlay))["WECOMBOT_HISTORY_MAX_MB"])
        assert 0 < cap_mib <= 0.6 * int(size.removesuffix("Gi")) * 1024, (overlay, cap_mib, size)


# ---------------------------------------------------------------- exposure


def test_only_the_callback_path_is_exposed_with_tls(docs: list[dict[str, Any]]) -> None:
    (ingress,) = of_kind(docs, "Ingress")
    settings = _settings("gateway", _service_env(docs, "gateway"))
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == settings.callback_path
    assert path["pathType"] == "Exact"
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == [rule["host"]]
    assert tls["secretName"]
    backend = path["backend"]["service"]
    service = one(docs, "Service", backend["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    gateway = _container(one(docs, "Deployment", "wecombot-gateway"))
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]}[port["targetPort"]] == (
        settings.port
    )
    assert (
        service["spec"]["selector"]
        == one(docs, "Deployment", "wecombot-gateway")["spec"]["selector"]["matchLabels"]
    )
    assert service["spec"]["type"] == "ClusterIP"
    assert [s["metadata"]["name"] for s in of_kind(docs, "Service")] == ["wecombot-gateway"]


# ---------------------------------------------------------------- network policy


def _selects(selector: dict[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        op, key, values = expr["operator"], expr["key"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


Peer = dict[str, Any]  # {"ip": "1.2.3.4"} or {"pod": labels, "namespace": labels}


def _peer_matches(rule_peer: dict[str, Any], peer: Peer, own_ns: Mapping[str, str]) -> bool:
    if "ipBlock" in rule_peer:
        if "ip" not in peer:
            return False
        ip = ipaddress.ip_address(peer["ip"])
        block = rule_peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if "pod" not in peer:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], peer["namespace"]):
            return False
    elif peer["namespace"] != own_ns:
        return False
    return _selects(rule_peer.get("podSelector", {}), peer["pod"])


def _allowed(
    policies: list[dict[str, Any]],
    direction: str,
    pod: Mapping[str, str],
    peer: Peer,
    port: int,
    protocol: str = "TCP",
    named: Mapping[str, int] | None = None,
) -> bool:
    """Kubernetes NetworkPolicy semantics, for the fields these manifests use; ``named``:
    the pod's named container ports (a policy may name a port instead of numbering it)."""
    own_ns = {"kubernetes.io/metadata.name": NAMESPACE}
    kind = "Ingress" if direction == "ingress" else "Egress"
    selecting = [
        p
        for p in policies
        if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    peers_key = "from" if direction == "ingress" else "to"
    for policy in selecting:
        for rule in policy["spec"].get(direction, []):
            ports = rule.get("ports")
            if ports and not any(
                (named or {}).get(p.get("port"), p.get("port")) == port
                and p.get("protocol", "TCP") == protocol
                for p in ports
            ):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_matches(rp, peer, own_ns) for rp in peers):
                return True
    return False


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    pods = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"][
            "template"
        ]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }
    assert set(pods) == {*SERVICES, "setup"}
    return pods


def _ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def test_network_policy_reachability(docs: list[dict[str, Any]]) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    pods = _pods(docs)
    here = _ns(NAMESPACE)
    internet = {"ip": PUBLIC_IP}
    nats_pod = {"pod": NATS_POD, "namespace": here}
    outsider = {"pod": {"app": "curious"}, "namespace": _ns("elsewhere")}
    ingress_controller = {"pod": {"app": "ingress-nginx"}, "namespace": _ns("ingress-nginx")}
    prometheus = {"pod": {"app": "prometheus"}, "namespace": _ns("monitoring")}

    named = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: {
            p["name"]: p["containerPort"] for p in _container(d).get("ports", [])
        }
        for d in of_kind(docs, "Deployment")
    }

    def allowed(direction: str, pod: Mapping[str, str], peer: Peer, port: int) -> bool:
        component = pod.get("app.kubernetes.io/component", "")
        return _allowed(policies, direction, pod, peer, port, named=named.get(component))

    for name, labels in pods.items():
        # Every pod reaches NATS and DNS, and NATS lets it in.
        assert allowed("egress", labels, nats_pod, 4222), name
        assert allowed("ingress", NATS_POD, {"pod": labels, "namespace": here}, 4222), name
        dns = {"pod": {"k8s-app": "kube-dns"}, "namespace": _ns("kube-system")}
        assert _allowed(policies, "egress", labels, dns, 53, "UDP"), name
        # Internet HTTPS: WeCom for token and sender, the model for llm; nobody else.
        assert allowed("egress", labels, internet, 443) == (name in {"token", "sender", "llm"})
        assert not allowed("egress", labels, internet, 80), name
        assert not allowed("egress", labels, {"ip": "10.1.2.3"}, 443), name  # cluster ranges
        assert not allowed("egress", labels, {"ip": "169.254.169.254"}, 443), name  # metadata
        # The same over IPv6 (an IPv6-only cluster; NAT64's 64:ff9b::/96 is the internet).
        for ip in (PUBLIC_IPV6, "64:ff9b::cb00:710a"):
            assert allowed("egress", labels, {"ip": ip}, 443) == (
                name in {"token", "sender", "llm"}
            ), (name, ip)
        for ip in ("fd00::10", "fe80::1"):  # unique-local (cluster) and link-local
            assert not allowed("egress", labels, {"ip": ip}, 443), (name, ip)
        # Nothing from outside the namespace but the ingress controller → gateway:8080.
        for port in (8080, 8081, 8082, 8083):
            assert allowed("ingress", labels, ingress_controller, port) == (
                name == "gateway" and port == 8080
            ), (name, port)
            assert not allowed("ingress", labels, internet, port)
            assert not allowed("ingress", labels, outsider, port)
        # Prometheus in `monitoring` scrapes each pod's own port, and only that.
        own = {"gateway": 8080, "llm": 8081, "sender": 8082, "token": 8083}.get(name)
        for port in (8080, 8081, 8082, 8083, 4222):
            assert allowed("ingress", labels, prometheus, port) == (port == own), (name, port)
        # Services do not talk to each other except through NATS.
        for other, other_labels in pods.items():
            peer = {"pod": other_labels, "namespace": here}
            for port in (8080, 8081, 8082, 8083):
                assert not allowed("egress", labels, peer, port), (name, other, port)
    # The WeCom and model egress policies name their services explicitly.
    wecom = one(docs, "NetworkPolicy", "wecombot-wecom-egress")
    model = one(docs, "NetworkPolicy", "wecombot-model-egress")
    assert {n for n, lab in pods.items() if _selects(wecom["spec"]["podSelector"], lab)} == {
        "token",
        "sender",
    }
    assert {n for n, lab in pods.items() if _selects(model["spec"]["podSelector"], lab)} == {"llm"}
    # NATS: clients in, routes between servers, KEDA on monitoring only.
    nats_peer = {"pod": NATS_POD, "namespace": here}
    assert allowed("egress", NATS_POD, nats_peer, 6222)
    assert allowed("ingress", NATS_POD, nats_peer, 6222)
    keda = {"pod": {"app": "keda-operator"}, "namespace": _ns("keda")}
    assert allowed("ingress", NATS_POD, keda, 8222)
    assert not allowed("ingress", NATS_POD, keda, 4222)
    assert not allowed("ingress", NATS_POD, outsider, 4222)
    assert not allowed("ingress", NATS_POD, internet, 4222)
    assert not allowed("egress", NATS_POD, internet, 443)
    box = {"pod": NATS_BOX_POD, "namespace": here}
    assert allowed("egress", NATS_BOX_POD, nats_pod, 4222)
    assert allowed("ingress", NATS_POD, box, 4222)
    # cert-manager's HTTP-01 solver pod (prod's issuer) is reached by the ingress
    # controller on its port, by nobody else; without it the certificate never issues.
    solver = {"acme.cert-manager.io/http01-solver": "true"}
    assert allowed("ingress", solver, ingress_controller, 8089)
    assert not allowed("ingress", solver, outsider, 8089)
    assert not allowed("ingress", solver, ingress_controller, 8080)


# ---------------------------------------------------------------- NATS: one source of truth


def _auth_users() -> set[str]:
    return set(re.findall(r"^\s*user:\s*(\w+)\s*$", AUTH_CONF.read_text(), flags=re.M))


def _auth_variables() -> set[str]:
    return set(re.findall(r"\$(WECOMBOT_NATS_\w+_PASSWORD)", AUTH_CONF.read_text()))


def test_auth_conf_users_helm_values_and_secret_template_agree() -> None:
    users = _auth_users()
    assert users == {*SERVICES, "setup", "admin"}
    assert _auth_variables() == {f"WECOMBOT_NATS_{u.upper()}_PASSWORD" for u in users}
    env = load_yaml(NATS_DIR / "values.yaml")["container"]["env"]
    for user in users:
        ref = env[f"WECOMBOT_NATS_{user.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "wecombot-nats", "key": user}
    (nats_secret,) = [
        s for s in load_all_yaml(SECRET_TEMPLATE) if s["metadata"]["name"] == "wecombot-nats"
    ]
    assert set(nats_secret["stringData"]) == users


def test_every_secret_reference_exists_in_the_template(overlay: str) -> None:
    template = {s["metadata"]["name"]: set(s["stringData"]) for s in load_all_yaml(SECRET_TEMPLATE)}
    for doc in render(overlay):
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for name, key in _secret_refs(container).values():
                assert key in template[name], (doc["metadata"]["name"], name, key)


def test_helm_values_include_the_authorization_and_docs_install_it() -> None:
    values = load_yaml(NATS_DIR / "values.yaml")
    assert values["config"]["merge"] == {"00$include": "auth.conf"}
    flag = "--set-file 'configMap.merge.data.auth\\.conf=deploy/nats/auth.conf'"
    assert flag in (NATS_DIR / "values.yaml").read_text()
    assert flag in (ROOT / "docs" / "deploy.md").read_text()
    # The services' NATS_URL names the release's client Service.
    for overlay in OVERLAYS:
        assert _config(render(overlay))["NATS_URL"] == "nats://nats:4222"


@pytest.mark.parametrize("values_file", ["values-dev.yaml", "values-prod.yaml"])
def test_nats_server_accepts_the_config_the_chart_renders(values_file: str, tmp_path: Path) -> None:
    """The chart renders nats.conf from the values and includes auth.conf beside it;
    parse an equivalent config with the real nats-server (`-t`: check and exit)."""
    values = load_yaml(NATS_DIR / values_file)
    conf = tmp_path / "nats.conf"
    (tmp_path / "auth.conf").write_bytes(AUTH_CONF.read_bytes())
    lines = [
        "include auth.conf;",
        "port: 4222",
        "http_port: 8222",
        'server_name: "nats-0"',
        "jetstream {",
        '  store_dir: "/data/jetstream"',
        "}",
    ]
    if values["config"]["cluster"]["enabled"]:
        replicas = values["config"]["cluster"]["replicas"]
        routes = ", ".join(f'"nats://nats-{i}.nats-headless:6222"' for i in range(replicas))
        lines += ["cluster {", '  name: "nats"', "  port: 6222", f"  routes: [{routes}]", "}"]
    conf.write_text("\n".join(lines) + "\n")
    env = {f"WECOMBOT_NATS_{u.upper()}_PASSWORD": "p" + "0" * 48 for u in _auth_users()}
    from wecombot_common.embedded import nats_server_binary

    result = subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the passwords in its environment the server refuses to start.
    result = subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0


def test_kubectl_used_to_render_is_real() -> None:
    out = subprocess.run(
        [tool("kubectl"), "version", "--client"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "Kustomize Version" in out
