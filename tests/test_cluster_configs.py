"""Every YAML under cluster/ and deploy/ validates against its own schema, and a broken copy of each fails.

Schemas: the Ray cluster launcher's `ray/autoscaler/ray-schema.json` (inside the ray package), the
KubeRay CRDs in ../shared/schemas/kuberay/ (tests skip when that folder is absent), Ray Serve's
`ServeDeploySchema` plus ftray's own `ServeConfig` for the app's `args`, and the job spec for job specs
embedded in a ConfigMap.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests._specs import ROOT

KUBERAY = ROOT.parent / "shared" / "schemas" / "kuberay"
CONFIGS = sorted(str(p.relative_to(ROOT)) for d in ("cluster", "deploy") for p in (ROOT / d).rglob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def load_docs(rel: str) -> list[dict]:
    return [d for d in yaml.load_all((ROOT / rel).read_text(), Loader=_Loader) if d is not None]


# ------------------------------------------------------------------------------------------ validators


@functools.cache
def _launcher_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def validate_launcher(doc: dict) -> None:
    jsonschema.validate(doc, _launcher_schema(), cls=jsonschema.Draft7Validator)
    # What `ray up` checks beyond the JSON schema (head type exists, min/max workers add up).
    from ray.autoscaler._private.util import validate_config

    validate_config(doc)


def _strict(schema: dict) -> dict:
    """Refuse unknown keys where the CRD lists the known ones, as `kubectl apply --validate=strict` does:
    a typo (`replica:`) would otherwise pass the schema and be pruned silently by the API server."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_schema(kind: str, version: str) -> dict:
    if not KUBERAY.is_dir():
        pytest.skip(f"needs the KubeRay CRD schemas: {KUBERAY} is absent")
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=_Loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(v["schema"]["openAPIV3Schema"])
    raise ValueError(f"{kind}: the CRD has no version {version!r}")


def validate_crd(doc: dict) -> None:
    group, _, version = doc["apiVersion"].partition("/")
    if group != "ray.io" or doc.get("kind") not in CRD_FILES:
        raise ValueError(f"not a KubeRay resource: {doc.get('apiVersion')} {doc.get('kind')}")
    jsonschema.validate(doc, _crd_schema(doc["kind"], version), cls=jsonschema.Draft7Validator)
    if not isinstance(doc.get("metadata", {}).get("name"), str):
        raise ValueError("metadata.name is required")
    if doc["kind"] == "RayService" and "serveConfigV2" in doc["spec"]:
        validate_serve(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def validate_serve(doc: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from ftray.serve.config import ServeConfig

    schema = ServeDeploySchema.model_validate(doc)
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        if not callable(getattr(importlib.import_module(module), attr, None)):
            raise ValueError(f"{app.name}: import_path {app.import_path} is not a callable")
        if app.import_path == "ftray.serve.app:build_app":
            ServeConfig.model_validate(app.args)  # what build_app does before any replica starts


def validate_configmap(doc: dict) -> None:
    """A ConfigMap that carries an ftray job spec (`job.yaml`), e.g. for a RayJob's entrypoint."""
    from ftray.config import spec_from_dict

    if doc.get("apiVersion") != "v1" or not isinstance(doc.get("metadata", {}).get("name"), str):
        raise ValueError("a ConfigMap needs apiVersion v1 and metadata.name")
    data = doc.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("ConfigMap data is a map of strings")
    for key, text in data.items():
        if key.endswith(".yaml"):
            spec_from_dict(yaml.safe_load(text), source=f"ConfigMap {doc['metadata']['name']}/{key}")


def validator_for(doc: dict) -> Callable[[dict], None]:
    if doc.get("kind") == "ConfigMap":
        return validate_configmap
    if "apiVersion" in doc:
        return validate_crd
    if "provider" in doc or "cluster_name" in doc:
        return validate_launcher
    if "applications" in doc:
        return validate_serve
    raise AssertionError(f"no schema known for a document with keys {sorted(doc)}")


def validate_file(docs: list[dict]) -> None:
    for doc in docs:
        validator_for(doc)(doc)


# ------------------------------------------------------------------------------------------ good files


def test_the_shipped_configs_are_all_here():
    assert set(CONFIGS) >= {
        "cluster/aws.yaml",
        "cluster/gcp.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "deploy/adapters.yaml",
        "deploy/reward.yaml",
        "deploy/kuberay/rayservice.yaml",
    }, CONFIGS


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_validates_against_its_schema(rel):
    validate_file(load_docs(rel))


# ------------------------------------------------------------------------------------------ broken copies


def _set(path: str, value):
    """A mutation: set (or, with value DELETE, remove) the dotted key in document `path[0]`."""

    def mutate(docs: list[dict]) -> None:
        idx, *keys = path.split(".")
        node = docs[int(idx)]
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


DELETE = object()


def _in_serve_config(key_path: str, value):
    """Break the Serve config embedded as a string in a RayService."""

    def mutate(docs: list[dict]) -> None:
        inner = [yaml.safe_load(docs[0]["spec"]["serveConfigV2"])]
        _set(key_path, value)(inner)
        docs[0]["spec"]["serveConfigV2"] = yaml.safe_dump(inner[0])

    return mutate


def _in_job_spec(key_path: str, value):
    def mutate(docs: list[dict]) -> None:
        inner = [yaml.safe_load(docs[0]["data"]["job.yaml"])]
        _set(key_path, value)(inner)
        docs[0]["data"]["job.yaml"] = yaml.safe_dump(inner[0])

    return mutate


# Per file: (what is broken, how, the phrase(s) the validator's error must contain).
BROKEN = {
    "cluster/aws.yaml": [
        ("required `provider` removed", _set("0.provider", DELETE), "'provider' is a required property"),
        ("misspelt top-level key", _set("0.setup_command", ["true"]), "Additional properties are not allowed"),
        ("head type not a node type", _set("0.head_node_type", "cpu_head"), "must be one of `available_node_types`"),
    ],
    "cluster/gcp.yaml": [
        ("max_workers as a string", _set("0.max_workers", "eight"), "is not of type 'integer'"),
        ("node type without node_config", _set("0.available_node_types.gpu_l4.node_config", DELETE), "'node_config' is a required"),
    ],
    "cluster/kuberay/raycluster.yaml": [
        ("head pod template removed", _set("0.spec.headGroupSpec.template", DELETE), "'template' is a required property"),
        ("misspelt worker group key", _set("0.spec.workerGroupSpecs.0.replica", 2), "Additional properties are not allowed"),
        ("unknown auth mode", _set("0.spec.authOptions.mode", "password"), "is not one of"),
    ],
    "cluster/kuberay/rayjob.yaml": [
        ("boolean as a string", _set("1.spec.shutdownAfterJobFinishes", "yes"), "is not of type 'boolean'"),
        ("worker group without maxReplicas", _set("1.spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", DELETE), "'maxReplicas' is a required"),
        ("unknown placement strategy", _in_job_spec("0.scaling.placement_strategy", "SPREAD_OUT"), "scaling.placement_strategy"),
    ],
    "deploy/adapters.yaml": [
        ("import_path removed", _set("0.applications.0.import_path", DELETE), ("ServeDeploySchema", "import_path", "Field required")),
        ("misspelt ftray arg", _set("0.applications.0.args.generation.0.adaptors", {}), ("ServeConfig", "adaptors")),
    ],
    "deploy/reward.yaml": [
        ("applications not a list", _set("0.applications", "ftray"), ("ServeDeploySchema", "applications")),
        ("unknown scorer kind", _set("0.applications.0.args.scorers.0.kind", "rewards"), ("ServeConfig", "kind", "rewards")),
    ],
    "deploy/kuberay/rayservice.yaml": [
        ("rayClusterConfig removed", _set("0.spec.rayClusterConfig", DELETE), "'rayClusterConfig' is a required property"),
        ("bad Serve args inside serveConfigV2", _in_serve_config("0.applications.0.args.generation.0.dtype", "fp8"), ("ServeConfig", "dtype", "fp8")),
    ],
}


def test_every_config_has_broken_copies():
    assert set(BROKEN) == set(CONFIGS), "add broken copies for a new config file (and remove stale ones)"


@pytest.mark.parametrize(
    "rel, what, mutate, says",
    [(rel, what, m, says) for rel, cases in BROKEN.items() for what, m, says in cases],
    ids=[f"{rel}:{what}" for rel, cases in BROKEN.items() for what, _, _ in cases],
)
def test_broken_copy_fails_validation(rel, what, mutate, says):
    docs = copy.deepcopy(load_docs(rel))
    mutate(docs)
    with pytest.raises(Exception) as e:  # noqa: B017 - jsonschema, pydantic and ftray each raise their own
        validate_file(docs)
    for phrase in (says,) if isinstance(says, str) else says:
        assert phrase in str(e.value), f"{rel} ({what}): {e.value}"


# ------------------------------------------------------------------------------------------ policies

# Credentials never live in these files: roles, service accounts and Secrets supply them.
SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # an AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]",
    r"(?i)aws_access_key_id\s*[:=]",
    r"RAY_AUTH_TOKEN\s*[:=]\s*\S",
    r"(?i)private_key",
    r"(?i)\bpassword\s*:",
]


@pytest.mark.parametrize("rel", CONFIGS)
def test_no_credentials_in_config(rel):
    text = (ROOT / rel).read_text()
    found = [p for p in SECRET_PATTERNS if re.search(p, text)]
    assert not found, f"{rel} matches {found}"


@pytest.mark.parametrize("rel", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_launcher_nodes_start_with_token_auth_and_a_loopback_dashboard(rel):
    (doc,) = load_docs(rel)
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in doc[k] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])
    # The token comes from the cloud's secret store into Ray's default token path on every node.
    assert any("~/.ray/auth_token" in c and "umask 077" in c for c in doc["setup_commands"]), doc["setup_commands"]
    # Storage access through the node's role / service account, never keys in the environment.
    for name, t in doc["available_node_types"].items():
        cfg = t["node_config"]
        assert "IamInstanceProfile" in cfg or "serviceAccounts" in cfg, name


@pytest.mark.parametrize("rel", [c for c in CONFIGS if "kuberay" in c])
def test_kuberay_clusters_use_token_auth(rel):
    for doc in load_docs(rel):
        if doc.get("apiVersion") != "ray.io/v1":
            continue
        spec = doc["spec"]
        cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
        assert cluster["authOptions"]["mode"] == "token", rel
        assert int(cluster["rayVersion"].split(".")[1]) >= 52  # token auth needs Ray >= 2.52


def test_rayjob_entrypoint_reads_the_mounted_job_spec():
    cm, job = load_docs("cluster/kuberay/rayjob.yaml")
    assert job["spec"]["entrypoint"].split()[:2] == ["ftray", "train"]
    spec_path = job["spec"]["entrypoint"].split()[2]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert os.path.join(mount["mountPath"], "job.yaml") == spec_path and "job.yaml" in cm["data"]
