"""k8s/, the cluster side the chart relies on: `kubectl kustomize` builds it offline, every object
validates against Kubernetes' schemas, every pod passes Pod Security "restricted", and the chart's
defaults name what k8s/ creates."""

import shutil
import urllib.parse

import pytest
import yaml

from tests.conftest import ROOT
from tests.helm import kubectl  # noqa: F401  (fixture)
from tests.manifests import CHART, objects, validate

pytestmark = pytest.mark.integration

K8S = ROOT / "k8s"


@pytest.fixture(scope="module")
def cluster_objects(kubectl, tmp_path_factory):  # noqa: F811
    """k8s/ built with the example secrets (the real ones are never in the repository)."""
    import subprocess

    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    for example in (tree / "secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    proc = subprocess.run([str(kubectl), "kustomize", str(tree)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in objects(proc.stdout)}


def test_every_object_validates(cluster_objects):
    for obj in cluster_objects.values():
        validate(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "gnr"


def test_everything_the_chart_needs_is_there(cluster_objects):
    assert set(cluster_objects) >= {
        ("Namespace", "gnr"), ("ServiceAccount", "gnr-job"), ("Role", "gnr-submitter"),
        ("RoleBinding", "gnr-submitters"), ("PersistentVolumeClaim", "gnr-shards"),
        ("PersistentVolumeClaim", "gnr-checkpoints"), ("Secret", "gnr-s3"), ("Secret", "gnr-postgres"),
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("Deployment", "minio"), ("Service", "minio"), ("Job", "minio-buckets"),
        ("NetworkPolicy", "default-deny-ingress"),
    }
    assert cluster_objects[("ServiceAccount", "gnr-job")]["automountServiceAccountToken"] is False
    for claim in ("gnr-shards", "gnr-checkpoints"):  # every node of a job mounts them
        assert cluster_objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_chart_defaults_name_what_k8s_creates(cluster_objects):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ("ServiceAccount", values["serviceAccountName"]) in cluster_objects
    assert ("PersistentVolumeClaim", values["checkpoints"]["claimName"]) in cluster_objects
    assert ("PersistentVolumeClaim", values["data"]["pvc"]["claimName"]) in cluster_objects
    uri = urllib.parse.urlsplit(values["mlflow"]["trackingUri"])
    service = cluster_objects[("Service", "mlflow")]
    assert uri.hostname == "mlflow.gnr.svc.cluster.local" and uri.port == service["spec"]["ports"][0]["port"]
    s3 = cluster_objects[("Secret", "gnr-s3")]
    assert set(s3["data"]) == {values["s3"]["credentials"]["accessKeyIdKey"],
                               values["s3"]["credentials"]["secretAccessKeyKey"]}


def test_pods_meet_pod_security_restricted(cluster_objects):
    namespace = cluster_objects[("Namespace", "gnr")]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    templates = [o["spec"]["template"] for o in cluster_objects.values() if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(templates) == 4
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            for e in c.get("env", []):  # credentials only by reference
                if any(w in e["name"] for w in ("PASSWORD", "SECRET", "KEY_ID")):
                    assert "secretKeyRef" in e["valueFrom"], e


def test_network_policies_admit_the_jobs(cluster_objects):
    def sources(name: str) -> list:
        return [peer["podSelector"] for rule in cluster_objects[("NetworkPolicy", name)]["spec"]["ingress"]
                for peer in rule["from"]]

    gnr = {"matchLabels": {"app.kubernetes.io/name": "gnr"}}
    assert sources("gnr-jobs") == [gnr] and sources("mlflow") == [gnr]
    assert sources("postgres") == [{"matchLabels": {"app.kubernetes.io/name": "mlflow"}}]
    (minio,) = sources("minio")
    assert set(minio["matchExpressions"][0]["values"]) == {"mlflow", "gnr", "minio-buckets"}
