"""The cluster manifests, checked offline as far as their tools allow.

* Ray cluster launcher YAML: validated against the JSON schema Ray ships (ray/autoscaler/ray-schema.json).
* KubeRay RayJob / RayCluster: parsed, and every key checked against the KubeRay v1 CRD fields and the
  Kubernetes PodSpec / Container fields we use (a hand-kept subset of those schemas: no cluster, no
  network here); rayStartParams must be strings, as the CRD's map[string]string demands.
* Slurm script and ray-node.sh: `bash -n`, and shellcheck when it is installed.
* Every command the manifests run exists: the dip module entry points, the configs they name.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = os.path.join(REPO, "cluster", "manifests")

# KubeRay ray.io/v1 CRD fields (ray-operator/config/crd/bases/ray.io_rayclusters.yaml, ray.io_rayjobs.yaml).
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "jobId", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "backoffLimit", "submissionMode", "submitterPodTemplate", "submitterConfig",
               "rayClusterSpec", "clusterSelector", "suspend", "entrypointNumCpus", "entrypointNumGpus",
               "entrypointResources", "metadata", "managedBy", "deletionStrategy"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
                "template", "scaleStrategy", "numOfHosts", "suspend"}
# Kubernetes core/v1 fields used in our pod templates.
POD_SPEC = {"containers", "initContainers", "volumes", "tolerations", "nodeSelector", "affinity",
            "terminationGracePeriodSeconds", "serviceAccountName", "restartPolicy", "priorityClassName",
            "imagePullSecrets", "securityContext", "hostNetwork", "schedulerName"}
CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
             "volumeMounts", "lifecycle", "livenessProbe", "readinessProbe", "securityContext", "workingDir"}
ENV_VAR = {"name", "value", "valueFrom"}
RESOURCES = {"requests", "limits", "claims"}
LIFECYCLE = {"preStop", "postStart"}
VOLUME = {"name", "persistentVolumeClaim", "emptyDir", "hostPath", "configMap", "secret", "nfs"}


def _load(name: str) -> dict:
    with open(os.path.join(MANIFESTS, name)) as handle:
        return yaml.safe_load(handle)


def _keys_within(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    assert not unknown, f"{where}: unknown fields {sorted(unknown)} (valid: {sorted(allowed)})"


def _check_pod_template(template: dict, where: str) -> list[dict]:
    _keys_within(template, {"metadata", "spec"}, where)
    spec = template["spec"]
    _keys_within(spec, POD_SPEC, f"{where}.spec")
    assert spec["containers"], f"{where}: no containers"
    for container in spec["containers"]:
        _keys_within(container, CONTAINER, f"{where}.containers[{container.get('name')}]")
        for env in container.get("env", []):
            _keys_within(env, ENV_VAR, f"{where}.env")
            assert isinstance(env.get("value", ""), str), f"{where}: env {env['name']} must be a string"
        _keys_within(container.get("resources", {}), RESOURCES, f"{where}.resources")
        _keys_within(container.get("lifecycle", {}), LIFECYCLE, f"{where}.lifecycle")
    for volume in spec.get("volumes", []):
        _keys_within(volume, VOLUME, f"{where}.volumes")
    return spec["containers"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    _keys_within(spec, RAYCLUSTER_SPEC, where)
    assert spec["rayVersion"] == "2.60.0", "rayVersion must match the ray pin in pyproject.toml"
    head = spec["headGroupSpec"]
    _keys_within(head, HEAD_GROUP, f"{where}.headGroupSpec")
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are map[string]string"
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not take training workers"
    _check_pod_template(head["template"], f"{where}.headGroupSpec.template")
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        _keys_within(group, WORKER_GROUP, f"{where}.workerGroupSpecs[{group['groupName']}]")
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = _check_pod_template(group["template"], f"{where}.workerGroupSpecs.template")
        gpus = containers[0]["resources"]["limits"].get("nvidia.com/gpu")
        if gpus:
            gpu_groups += 1
            assert group["rayStartParams"]["num-gpus"] == gpus, "Ray's GPU count must match the pod's GPUs"
            pre_stop = containers[0]["lifecycle"]["preStop"]["exec"]["command"]
            assert "ray-node.sh" in " ".join(pre_stop) and "--drain-only" in pre_stop
            grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
            drain = int(next(e["value"] for e in containers[0]["env"] if e["name"] == "DIP_PREEMPT_GRACE_S"))
            assert grace > drain, "Kubernetes must not SIGKILL the pod before the drain window ends"
        env_names = {e["name"] for e in containers[0]["env"]}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env_names, "every node needs Ray's token auth settings"
    assert gpu_groups >= 1, "a GPU worker group is required"


def test_kuberay_raycluster_fields_exist_in_the_crd():
    doc = _load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"], "RayCluster.spec")


def test_kuberay_rayjob_fields_exist_in_the_crd_and_run_dip_train():
    doc = _load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _keys_within(spec, RAYJOB_SPEC, "RayJob.spec")
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars", "working_dir", "pip", "py_modules", "excludes"}
    entry = spec["entrypoint"]
    assert "python -m cluster.submit --check-pins" in entry and "python -m cluster.cli train" in entry
    config = entry.split("train ", 1)[1].split()[0]
    assert os.path.isfile(os.path.join(REPO, config)), f"the entrypoint's config {config} is not in the project"
    assert "cluster.address=auto" in entry


def test_ray_cluster_launcher_yaml_is_valid_for_rays_own_schema():
    import jsonschema
    import ray

    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as handle:
        schema = json.load(handle)
    doc = _load("ray-cluster-aws.yaml")
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
    gpu_types = [t for t in doc["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types, "a GPU node type is required"
    # a schema violation is caught (the check above is not vacuous)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "max_wrokers": 3}, schema)


@pytest.mark.parametrize("script", ["slurm-dip.sbatch", "ray-node.sh"])
def test_shell_scripts_parse_with_bash(script):
    path = os.path.join(MANIFESTS, script)
    out = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", ["slurm-dip.sbatch", "ray-node.sh"])
def test_shell_scripts_pass_shellcheck(script):
    out = subprocess.run(["shellcheck", "--severity=style", os.path.join(MANIFESTS, script)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_slurm_script_starts_ray_across_the_allocation_then_runs_dip_train():
    text = open(os.path.join(MANIFESTS, "slurm-dip.sbatch")).read()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any("--signal=B:TERM@" in d for d in directives), "the time limit must leave time for a checkpoint"
    assert any("--requeue" in d for d in directives)
    assert "ray-node.sh --head" in text and 'ray-node.sh --address="$RAY_ADDRESS"' in text
    assert "python -m cluster.cli train" in text and "cluster.address=auto" in text
    assert "scontrol show hostnames" in text and "RAY_AUTH_TOKEN" in text


def test_dockerfile_installs_the_pins_and_checks_them():
    text = open(os.path.join(MANIFESTS, "Dockerfile")).read()
    assert "torch==2.14.1 torchvision==0.29.1" in text
    assert "python -m cluster.submit --check-pins" in text
