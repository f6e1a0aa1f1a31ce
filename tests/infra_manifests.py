"""Helpers for the deployment tests: render the kustomize overlays, validate each object against its
schema, and find every pod template whatever kind carries it.

Schemas: Kubernetes core kinds against the JSON schemas shipped by the `kubernetes-validate` package
(strict variants: unknown fields rejected), for each version in K8S_VERSIONS; KubeRay's kinds against
infra/schemas/kuberay-v1.6.2.schema.yaml, whose embedded Kubernetes types resolve to the same package's
definitions of the same version. Rendering uses `kubectl kustomize` (kustomize v5 built into kubectl).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
OVERLAYS = ("local", "production")
# The oldest Kubernetes these manifests claim (README) and the one KubeRay v1.6.2 builds against (k8s.io/api v0.35).
K8S_VERSIONS = ("1.30.0", "1.35.0")
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-v1.6.2.schema.yaml"
RAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RuntimeError("kubectl is needed to render infra/k8s (`kubectl kustomize`); it is part of this "
                           "machine image (Debian package kubectl) - install it to run the deployment tests")
    return path


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object `kubectl kustomize infra/k8s/overlays/<overlay>` outputs."""
    out = subprocess.run([kubectl(), "kustomize", str(INFRA / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def _k8s_definitions(version: str) -> dict[str, Any]:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


@functools.cache
def _kuberay_validator(version: str):
    import jsonschema
    from referencing import Registry, Resource

    schema = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    registry = Registry().with_resources([
        (schema["$id"], Resource.from_contents(schema)),
        ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(_k8s_definitions(version))),
    ])
    jsonschema.Draft202012Validator.check_schema(schema)
    return {kind: jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)
            for kind in RAY_KINDS}


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise `jsonschema.ValidationError` if `doc` does not match its kind's schema at Kubernetes `version`."""
    if doc.get("apiVersion") == "ray.io/v1":
        if doc.get("kind") not in RAY_KINDS:
            raise ValueError(f"no schema for ray.io/v1 kind {doc.get('kind')!r}")
        _kuberay_validator(version)[doc["kind"]].validate(doc)
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def walk(obj: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key`, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v, key)


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayClusterSpec(s) a KubeRay object creates clusters from."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]]
    if kind == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod an object creates: workloads, CronJobs, KubeRay heads,
    worker groups and job submitters."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield f"{kind}/{name}", spec["template"]
    elif kind == "CronJob":
        yield f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]
    elif kind == "Pod":
        yield f"{kind}/{name}", {"metadata": doc["metadata"], "spec": spec}
    job = spec.get("jobTemplate") if kind == "RayCronJob" else spec if kind == "RayJob" else None
    if job and job.get("submitterPodTemplate"):
        yield f"{kind}/{name}/submitter", job["submitterPodTemplate"]
    for cluster in ray_cluster_specs(doc):
        yield f"{kind}/{name}/head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind}/{name}/{group['groupName']}", group["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])
