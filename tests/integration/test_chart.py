"""charts/gnr rendered by a real helm 3: lint, schema, every object validated, and the container's
command parsed by the real `gnr` CLI, so that the chart and the CLI cannot drift apart."""

import json
import subprocess

import pytest
import typer.main
import yaml

from gnr.config import build_config
from tests.conftest import run_gnr
from tests.helm import helm  # noqa: F401  (fixture)
from tests.manifests import CHART, helm_template, objects, pod_specs, validate, write_values

pytestmark = pytest.mark.integration

RUN_ID = "0123456789abcdef0123456789abcdef"
CLUSTER = {  # what a real cluster's values file sets: secrets by name only
    "s3": {"endpoint": "http://minio.gnr.svc.cluster.local:9000", "region": "us-east-1",
           "credentials": {"secretName": "gnr-s3"}},
    "mlflow": {"auth": {"secretName": "gnr-mlflow-auth"}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "training-high",
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "image": {"repository": "registry.example.com:5000/ml/gnr", "tag": "0.1.0"},
}


def train_values(nodes: int, gpus: int, preset: str = "swin-b", **extra) -> dict:
    cfg = build_config(preset=preset, fields={"objective.method": "gradnorm", "checkpoint.dir": "/checkpoints",
                                              "tracking.run_id": RUN_ID})
    return {"runId": RUN_ID, "train": {"nodes": nodes, "gpusPerNode": gpus, "config": cfg.to_yaml()}, **extra}


SCENARIOS = {
    "1x8": train_values(1, 8),
    "4x8": train_values(4, 8, **CLUSTER),
    "cpu-smoke": train_values(1, 0, preset="demo", checkpoints={"claimName": ""},
                              data={"pvc": {"claimName": "", "mountPath": "/data", "readOnly": True}},
                              resources={"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                              shmSize="1Gi", ttlSecondsAfterFinished=None),
    "trainer-4x8": train_values(4, 8, operator="trainer", **CLUSTER),
    "eval": {"task": "eval", "runId": RUN_ID, "eval": {"gpus": 2, "args": ["--attacks", "clean,pgd10"]}, **CLUSTER},
}
JOB_KIND = {"1x8": "PyTorchJob", "4x8": "PyTorchJob", "cpu-smoke": "PyTorchJob", "trainer-4x8": "TrainJob",
            "eval": "Job"}


@pytest.fixture(scope="module")
def rendered(helm, tmp_path_factory):  # noqa: F811
    """Each scenario rendered once: name -> (values file, objects)."""
    out = {}
    for name, values in SCENARIOS.items():
        path = write_values(tmp_path_factory.mktemp("values") / f"{name}.yaml", values)
        release = f"gnr-{values.get('task', 'train')}-{RUN_ID}"
        out[name] = path, objects(helm_template(helm, [path], release=release).stdout)
    return out


def only(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_helm_lint_is_clean(helm, rendered, scenario):  # noqa: F811
    args = [str(helm), "lint", "--strict", str(CHART)]
    if scenario:
        args += ["--values", str(rendered[scenario][0])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_validates(rendered, scenario):
    objs = rendered[scenario][1]
    kinds = sorted(o["kind"] for o in objs)
    expected = sorted([JOB_KIND[scenario]] + (["ConfigMap"] if scenario != "eval" else []))
    assert kinds == expected
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["namespace"] == "gnr"
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "gnr" and labels["gnr/run-id"] == RUN_ID
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("scenario,nodes", [("1x8", 1), ("4x8", 4)])
def test_pytorchjob_master_workers_gpus(rendered, scenario, nodes):
    job = only(rendered[scenario][1], "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["backoffLimit"] > 0 and job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] > 0
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the operator injects its env into this container
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"] == "dshm" and mounts["/checkpoints"] == "checkpoints" and mounts["/etc/gnr"] == "config"
        volumes = {v["name"]: v for v in replica["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["config"]["configMap"]["name"] == f"gnr-train-{RUN_ID}-config"
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "gnr-checkpoints"
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "gnr-shards", "readOnly": True}


def test_cluster_settings_reach_the_pods(rendered):
    for scenario in ("4x8", "trainer-4x8", "eval"):
        for pod, containers in pod_specs(only(rendered[scenario][1], JOB_KIND[scenario])):
            assert pod["nodeSelector"] == CLUSTER["nodeSelector"] and pod["tolerations"] == CLUSTER["tolerations"]
            assert pod["imagePullSecrets"] == [{"name": "regcred"}]
            if scenario != "trainer-4x8":  # a TrainJob takes its priority class from the runtime
                assert pod["priorityClassName"] == "training-high"
            for c in containers:
                env = {e["name"]: e for e in c["env"]}
                assert c["image"] == "registry.example.com:5000/ml/gnr:0.1.0"
                assert env["AWS_ENDPOINT_URL"]["value"] == CLUSTER["s3"]["endpoint"]
                assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
                    "name": "gnr-s3", "key": "AWS_SECRET_ACCESS_KEY"}
                assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "gnr-mlflow-auth"
                assert env["NCCL_DEBUG"]["value"] == "WARN"


def test_trainjob_is_the_same_job_for_trainer_v2(rendered):
    objs = rendered["trainer-4x8"][1]
    job, pytorchjob = only(objs, "TrainJob"), only(rendered["4x8"][1], "PyTorchJob")
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (pod, (container,)), = pod_specs(job)
    assert container["name"] == "node"  # the torch runtime's trainer container
    assert (trainer["command"], trainer["env"]) == (master["containers"][0]["command"], master["containers"][0]["env"])
    assert pod["volumes"] == master["volumes"]
    assert container["volumeMounts"] == master["containers"][0]["volumeMounts"]


def test_cpu_smoke_has_no_gpu_and_scratch_checkpoints(rendered):
    job = only(rendered["cpu-smoke"][1], "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "1" and "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"]
    (pod, (container,)), = pod_specs(job)
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {}} and "data" not in volumes


def test_configmap_holds_the_exact_resolved_config(rendered):
    for scenario in ("1x8", "cpu-smoke", "trainer-4x8"):
        values = SCENARIOS[scenario]
        config = only(rendered[scenario][1], "ConfigMap")["data"]["config.yaml"]
        assert config == values["train"]["config"]
        assert yaml.safe_load(config)["tracking"]["run_id"] == RUN_ID


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_non_root_without_privileges(rendered, scenario):
    for pod, containers in pod_specs(only(rendered[scenario][1], JOB_KIND[scenario])):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["serviceAccountName"] == "gnr-job"
        for c in containers:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
            assert csc["readOnlyRootFilesystem"] is True
            for e in c["env"]:  # credentials only by reference
                if any(w in e["name"] for w in ("PASSWORD", "SECRET", "KEY_ID", "TOKEN")):
                    assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], e


def _container(objs: list[dict], kind: str) -> dict:
    return pod_specs(only(objs, kind))[0][1][0]


@pytest.mark.parametrize("scenario", ["1x8", "trainer-4x8"])
def test_train_command_runs_the_real_gnr_train(rendered, scenario, tmp_path):
    """The pod's command, with its config and env, through `gnr train --dry-run`: it parses, and the
    trainer would run exactly the ConfigMap's config (MLFLOW_TRACKING_URI of the pod winning)."""
    objs = rendered[scenario][1]
    container = _container(objs, JOB_KIND[scenario])
    command = container["command"]
    assert command[:3] == ["torchrun", "-m", "gnr.cli.app"], command
    config = only(objs, "ConfigMap")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(config)
    args = [str(tmp_path / "config.yaml") if a == "/etc/gnr/config.yaml" else a for a in command[3:]]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    proc = run_gnr(*args, "--dry-run", "--json", env={**env, "HOME": str(tmp_path), "GNR_HOME": str(tmp_path)},
                   timeout=120, check=True)
    expected = yaml.safe_load(config)
    expected["tracking"]["uri"] = env["MLFLOW_TRACKING_URI"]
    assert json.loads(proc.stdout) == expected
    assert env["GNR_RUN_ID"] == RUN_ID


def test_eval_command_parses_with_the_real_gnr_eval(rendered):
    container = _container(rendered["eval"][1], "Job")
    command = container["command"]
    assert command[:5] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "gnr.cli.app"], command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    params = parse_cli(command[5:])
    assert params["run_id"] == RUN_ID and params["attacks"] == "clean,pgd10" and not params["submit"]
    # finished batches go to the checkpoint volume, so a preempted evaluation resumes in a new pod
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env["GNR_EVAL_CACHE"].startswith("/checkpoints/") and mounts["/checkpoints"] == "checkpoints"


def parse_cli(args: list[str]) -> dict:
    """Parse ``gnr ARGS`` with the real Typer/Click command tree, without running the command."""
    from gnr.cli.app import app

    group = typer.main.get_command(app)
    name, *rest = args
    with group.context_class(group, info_name="gnr") as ctx:
        command = group.get_command(ctx, name)
        assert command is not None, f"gnr has no command {name!r}"
        with command.make_context(name, rest, parent=ctx) as sub:
            return sub.params


@pytest.mark.parametrize("override,message", [
    ({"train": {"nodes": 0}}, "train.nodes"),
    ({"operator": "mpijob"}, "operator"),
    ({"unknown": 1}, "unknown"),
    ({"mlflow": {"trackingUri": "http://user:pass@mlflow:5000"}}, "mlflow.trackingUri"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
    ({"image": {"repository": "Not An Image"}}, "image.repository"),
    ({"runId": "other-run"}, "tracking.run_id"),
])
def test_bad_values_fail_to_render(helm, rendered, tmp_path, override, message):  # noqa: F811
    bad = write_values(tmp_path / "bad.yaml", override)
    proc = helm_template(helm, [rendered["1x8"][0], bad], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_config_must_use_the_checkpoint_volume(helm, tmp_path):  # noqa: F811
    values = train_values(1, 8)
    values["train"]["config"] = values["train"]["config"].replace("dir: /checkpoints", "dir: /elsewhere")
    proc = helm_template(helm, [write_values(tmp_path / "v.yaml", values)], check=False)
    assert proc.returncode != 0 and "checkpoint.dir" in proc.stderr, proc.stderr


def test_parse_cli_rejects_what_gnr_rejects():
    with pytest.raises(Exception, match="No such option: --no-such-option"):
        parse_cli(["train", "--no-such-option"])


@pytest.mark.parametrize("scenario,kind,typo", [
    ("1x8", "PyTorchJob", lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .update(imagePullPolicyy="Always")),
    ("trainer-4x8", "TrainJob", lambda o: o["spec"]["trainer"].update(numProcsPerNode=8)),
    ("eval", "Job", lambda o: o["spec"]["template"]["spec"].update(restartPolicyy="Never")),
    ("1x8", "ConfigMap", lambda o: o.update(datas={})),
])
def test_validation_rejects_unknown_fields(rendered, scenario, kind, typo):
    """The checks above have teeth: a misspelt field anywhere is an error, as on a real API server."""
    import copy

    obj = copy.deepcopy(only(rendered[scenario][1], kind))
    typo(obj)
    with pytest.raises(Exception, match="Additional properties are not allowed|additional properties"):
        validate(obj)
