"""Render the chart with a real helm and validate every object offline, as an API server would.

Kubeflow jobs are checked against the operators' own CRD schemas (vendored in tests/data/crds, see
NOTICE.md there), made strict the way `kubectl apply --validate=strict` is: a field a schema does
not name is an error (jsonschema alone would let a typo through, since CRD schemas leave
additionalProperties open and the API server prunes instead). Core objects (ConfigMap, Job,
Deployment, ...) are checked against Kubernetes' OpenAPI schemas by kubernetes-validate, strict,
for the oldest Kubernetes the chart supports and the newest the package knows.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "gnr"
CRDS = Path(__file__).resolve().parent / "data" / "crds"
CRD_FILES = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml", "TrainJob": "trainer.kubeflow.org_trainjobs.yaml"}
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def helm_template(helm: Path, values: list[Path] | None = None, release: str = "gnr-train-abc123",
                  namespace: str = "gnr", check: bool = True) -> subprocess.CompletedProcess:
    args = [str(helm), "template", release, str(CHART), "--namespace", namespace]
    for f in values or []:
        args += ["--values", str(f)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def objects(manifests: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(manifests) if d]


def write_values(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def validate(obj: dict) -> None:
    """Raise if ``obj`` is not an object the cluster would accept."""
    if obj["kind"] in CRD_FILES:
        jsonschema.validate(obj, _crd_schema(obj["kind"], obj["apiVersion"]))
        name = obj["metadata"]["name"]  # the CEL rules on names that jsonschema cannot run
        assert DNS_LABEL.fullmatch(name) and len(name) <= 63, f"invalid {obj['kind']} name {name!r}"
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@functools.cache
def _crd_schema(kind: str, api_version: str) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, api_version
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {api_version} is not served by the vendored CRD"
    return _strict(served[version]["schema"]["openAPIV3Schema"])


def _strict(schema):
    """Close every object schema that lists its properties and does not keep unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def pod_specs(obj: dict) -> list[tuple[dict, list[dict]]]:
    """(pod spec, gnr containers) of a job: the PyTorchJob's replicas, the TrainJob's runtime patch
    (its container fields merged with spec.trainer), or the Job's template."""
    kind, spec = obj["kind"], obj["spec"]
    if kind == "PyTorchJob":
        return [(r["template"]["spec"], r["template"]["spec"]["containers"]) for r in spec["pytorchReplicaSpecs"].values()]
    if kind == "TrainJob":
        out = []
        for patch in spec["runtimePatches"]:
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                pod = job["template"]["spec"]["template"]["spec"]
                out.append((pod, [{**spec["trainer"], **c} for c in pod["containers"]]))
        return out
    if kind == "Job":
        return [(spec["template"]["spec"], spec["template"]["spec"]["containers"])]
    return []
