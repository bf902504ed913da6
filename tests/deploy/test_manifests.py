"""deploy/kubernetes/: the manifests are valid for their schemas and agree with each other and
with the gateway's config.

Core kinds are checked with kubernetes-validate's strict schemas (unknown fields refused);
InferencePool and HTTPRoute with the JSON Schemas in ``schemas/`` (written from their CRDs)
plus the CRDs' CEL rules that matter here, in code. ``GATEWAY_TEST_CRD_DIR`` may name a folder
holding the upstream CRD files; they are then checked against those too.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config import GatewayConfig, parse_config
from plugins.metrics import MetricsConfig

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: The oldest Kubernetes the manifests are for (preStop ``sleep`` is on by default from 1.30).
K8S_VERSION = "1.33"

Doc = dict[str, Any]

#: (apiVersion, kind) -> the schema file in SCHEMAS, and the upstream CRD's file name.
CRD_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): (
        "inferencepool-v1.yaml",
        "inference.networking.k8s.io_inferencepools.yaml",
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): (
        "httproute-v1.yaml",
        "gateway.networking.k8s.io_httproutes.yaml",
    ),
}
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment")}


class Invalid(Exception):
    """A manifest its schema (or a CEL rule of its CRD) refuses."""


def load_documents() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = load_documents()


def _schema(file: str) -> Doc:
    schema: Doc = yaml.safe_load((SCHEMAS / file).read_text())
    return schema


def _cel_rules(doc: Doc) -> list[str]:
    """The CRDs' x-kubernetes-validations that JSON Schema cannot express, for these kinds."""
    problems = []
    spec = doc.get("spec", {})
    if doc["kind"] == "InferencePool":
        numbers = [p.get("number") for p in spec.get("targetPorts", [])]
        if len(numbers) != len(set(numbers)):
            problems.append("spec.targetPorts: port number must be unique")
        ref = spec.get("endpointPickerRef")
        if ref is not None and ref.get("kind", "Service") == "Service" and "port" not in ref:
            problems.append("spec.endpointPickerRef: port is required when kind is 'Service'")
    if doc["kind"] == "HTTPRoute":
        for i, rule in enumerate(spec.get("rules", [])):
            for ref in rule.get("backendRefs", []):
                service = ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
                if service and "port" not in ref:
                    problems.append(f"spec.rules[{i}].backendRefs: must have port for Service")
            for match in rule.get("matches", []):
                path = match.get("path", {})
                literal = path.get("type", "PathPrefix") != "RegularExpression"
                if literal and not path.get("value", "/").startswith("/"):
                    problems.append(f"spec.rules[{i}].matches: path must start with '/'")
    return problems


def validate(doc: Doc) -> None:
    """Raise :class:`Invalid` if ``doc`` is not a valid object of a known kind."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CORE_KINDS:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise Invalid(f"{'.'.join(map(str, err.path))}: {err.message}") from None
        return
    if key not in CRD_KINDS:
        raise Invalid(f"no schema for {key}")
    schema = _schema(CRD_KINDS[key][0])
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
    ]
    errors += _cel_rules(doc)
    if errors:
        raise Invalid("; ".join(errors))


def the(kind: str) -> Doc:
    [doc] = [d for _, d in DOCS if d["kind"] == kind]
    return doc


def pod_spec() -> Doc:
    spec: Doc = the("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> Doc:
    [c] = pod_spec()["containers"]
    assert isinstance(c, dict)
    return c


def container_port(name: str) -> int:
    [port] = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    assert isinstance(port, int)
    return port


def gateway_config() -> GatewayConfig:
    return parse_config(
        tomllib.loads(the("ConfigMap")["data"]["config.toml"]), "deploy/kubernetes ConfigMap"
    )


# --- every document is valid --------------------------------------------------------------------


def test_the_manifests_hold_each_kind_once() -> None:
    kinds = sorted((d["apiVersion"], d["kind"]) for _, d in DOCS)
    assert kinds == sorted(CORE_KINDS | set(CRD_KINDS))


@pytest.mark.parametrize(
    "doc", [d for _, d in DOCS], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_each_manifest_is_valid(doc: Doc) -> None:
    validate(doc)


# --- the validators bite --------------------------------------------------------------------------


def _broken(kind: str, change: Callable[[Doc], object]) -> Doc:
    doc = copy.deepcopy(the(kind))
    change(doc)
    return doc


def _container(doc: Doc) -> Doc:
    c: Doc = doc["spec"]["template"]["spec"]["containers"][0]
    return c


#: case -> (kind, the change, what the refusal says)
BROKEN: dict[str, tuple[str, Callable[[Doc], object], str]] = {
    "pool without targetPorts": (
        "InferencePool",
        lambda d: d["spec"].pop("targetPorts"),
        "'targetPorts' is a required property",
    ),
    "pool without endpointPickerRef": (
        "InferencePool",
        lambda d: d["spec"].pop("endpointPickerRef"),
        "'endpointPickerRef' is a required property",
    ),
    "pool with a duplicate target port": (
        "InferencePool",
        lambda d: d["spec"]["targetPorts"].append({"number": 8000}),
        "port number must be unique",
    ),
    "pool's EPP Service without a port": (
        "InferencePool",
        lambda d: d["spec"]["endpointPickerRef"].pop("port"),
        "port is required",
    ),
    "pool with the v1alpha2 field targetPortNumber": (
        "InferencePool",
        lambda d: d["spec"].update(targetPortNumber=8000),
        "'targetPortNumber' was unexpected",
    ),
    "pool with port 0": (
        "InferencePool",
        lambda d: d["spec"]["targetPorts"][0].update(number=0),
        "less than the minimum of 1",
    ),
    "pool with a bad failureMode": (
        "InferencePool",
        lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Ignore"),
        "'Ignore' is not one of",
    ),
    "route backendRef without a name": (
        "HTTPRoute",
        lambda d: d["spec"]["rules"][0]["backendRefs"][0].pop("name"),
        "'name' is a required property",
    ),
    "route to a Service without a port": (
        "HTTPRoute",
        lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(group="", kind="Service"),
        "must have port for Service",
    ),
    "route with an unknown rule field": (
        "HTTPRoute",
        lambda d: d["spec"]["rules"][0].update(backends=[]),
        "'backends' was unexpected",
    ),
    "route with a bad timeout": (
        "HTTPRoute",
        lambda d: d["spec"]["rules"][0].update(timeouts={"request": "5 minutes"}),
        "'5 minutes' does not match",
    ),
    "route with a relative path": (
        "HTTPRoute",
        lambda d: d["spec"]["rules"][0]["matches"][0]["path"].update(value="v1"),
        "path must start with '/'",
    ),
    "deployment with an unknown container field": (
        "Deployment",
        lambda d: _container(d).update(gpus=1),
        "'gpus' was unexpected",
    ),
    "deployment with a port given as a string": (
        "Deployment",
        lambda d: _container(d)["ports"][0].update(containerPort="8000"),
        "'8000' is not of type 'integer'",
    ),
    "deployment without a selector": (
        "Deployment",
        lambda d: d["spec"].pop("selector"),
        "'selector' is a required property",
    ),
    "service with an unknown field": (
        "Service",
        lambda d: d["spec"].update(targetPort=8000),
        "'targetPort' was unexpected",
    ),
    "configmap with a non-string value": (
        "ConfigMap",
        lambda d: d["data"].update(replicas=2),
        "2 is not of type 'string'",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_is_refused(case: str) -> None:
    kind, change, message = BROKEN[case]
    with pytest.raises(Invalid, match=re.escape(message)):
        validate(_broken(kind, change))


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(Invalid, match="no schema"):
        validate({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool"})


# --- the upstream CRDs, where given ----------------------------------------------------------


def _upstream_crd_schemas() -> Iterator[tuple[tuple[str, str], Doc]]:
    folder = os.environ.get("GATEWAY_TEST_CRD_DIR")
    if not folder:
        return
    for (api_version, kind), (_, crd_file) in CRD_KINDS.items():
        crd = yaml.safe_load((Path(folder) / crd_file).read_text())
        version = api_version.rpartition("/")[2]
        [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
        yield (api_version, kind), served["schema"]["openAPIV3Schema"]


def _strict_openapi(node: Any) -> Any:
    """An OpenAPI v3 schema as plain JSON Schema: x-kubernetes-* dropped, and objects with
    listed properties closed (the API server's strict field validation)."""
    if isinstance(node, list):
        return [_strict_openapi(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_openapi(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@pytest.mark.skipif(
    not os.environ.get("GATEWAY_TEST_CRD_DIR"),
    reason="GATEWAY_TEST_CRD_DIR (a folder with the upstream CRD files) is not set",
)
def test_crd_kinds_are_valid_for_the_upstream_crds() -> None:
    schemas = dict(_upstream_crd_schemas())
    assert set(schemas) == set(CRD_KINDS)

    def valid(doc: Doc) -> bool:
        schema = _strict_openapi(schemas[doc["apiVersion"], doc["kind"]])
        return jsonschema.Draft4Validator(schema).is_valid(doc) and not _cel_rules(doc)

    crd_docs = [d for _, d in DOCS if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert crd_docs and all(valid(d) for d in crd_docs)
    # what the schemas here refuse, the upstream ones do (but endpointPickerRef: optional
    # from GIE v1.6, required here as in v1.0 to v1.5)
    for case, (kind, change, _) in BROKEN.items():
        if kind in {k for _, k in CRD_KINDS} and case != "pool without endpointPickerRef":
            assert not valid(_broken(kind, change)), case


# --- the manifests agree with each other and with the gateway -------------------------------------


def test_the_pool_selects_the_deployments_pods() -> None:
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        the("InferencePool")["spec"]["selector"]["matchLabels"],
        the("Deployment")["spec"]["selector"]["matchLabels"],
        the("Service")["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()
    # llm-d's KV-event subscriber dials the pods labelled so
    assert labels["llm-d.ai/inference-serving"] == "true"


def test_the_pool_targets_the_gateways_port() -> None:
    config = gateway_config()
    assert config.server.host == "0.0.0.0"  # the EPP dials the pod IP
    ports = [p["number"] for p in the("InferencePool")["spec"]["targetPorts"]]
    assert ports == [container_port("http")] == [config.server.port]
    [service_port] = the("Service")["spec"]["ports"]
    assert service_port["targetPort"] == "http"


def test_the_route_sends_to_the_pool_and_the_pool_to_its_epp() -> None:
    pool = the("InferencePool")["metadata"]["name"]
    [rule] = the("HTTPRoute")["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}
    ]
    # the EPP Service GIE's inferencepool chart makes for a release named like the pool
    ref = the("InferencePool")["spec"]["endpointPickerRef"]
    assert ref["name"] == f"{pool}-epp"
    assert ref["port"] == {"number": 9002}


def test_probes_use_health_and_ready_on_the_http_port() -> None:
    c = container()
    expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/ready"}
    for probe, path in expected.items():
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # the startup probe allows a model load of minutes
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_pod_ip_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_the_configmap_is_what_the_container_serves() -> None:
    c = container()
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_map = the("ConfigMap")["metadata"]["name"]
    [name] = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == config_map]
    assert c["command"] == ["gateway", "serve", "--config", f"{mounts[name]}/config.toml"]
    assert "config.toml" in the("ConfigMap")["data"]


def test_the_config_publishes_kv_events_and_metrics() -> None:
    config = gateway_config()
    assert config.models
    for name, model in config.models.items():
        # llm-d splits the topic kv@HOST:PORT@MODEL on "@"
        assert "@" not in name
        assert model.kv_events is not None, name
        assert model.kv_events.endpoint == f"tcp://*:{container_port('kv-events')}"
        assert model.kv_events.topic is None  # the default carries $POD_IP
        assert model.load == "startup"  # /ready then means "the model is loaded"
        assert not model.aliases  # an alias would miss the scorer's prefix index
    metrics = config.plugins["metrics"]
    assert isinstance(metrics, MetricsConfig)
    assert metrics.enabled
    assert metrics.path == "/metrics"  # where the EPP scrapes by default


def test_the_epp_config_in_the_comments_matches_the_gateway() -> None:
    text = (DEPLOY / "inferencepool.yaml").read_text()
    [model] = gateway_config().models.items()
    assert set(re.findall(r"modelName: (\S+)", text)) == {model[0]}
    assert model[1].kv_events is not None
    assert re.findall(r"blockSize: (\d+)", text) == [str(model[1].kv_events.block_size)]
    assert f"socketPort: {container_port('kv-events')}" in text


def test_running_streams_finish_before_the_kill() -> None:
    spec = pod_spec()
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = gateway_config().server.drain_timeout_s
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain
