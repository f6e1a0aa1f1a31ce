"""Deployment files: they parse, carry the fields KubeRay/Kubernetes require, and agree on versions with
pyproject.toml (the image's Ray = every manifest's rayVersion = a version the project accepts)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_manifests():
    return [(p, d) for p in sorted(INFRA.rglob("*.yaml")) for d in docs(p)]


def project_spec(name):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?\s*(.*)$", dep)
        if m:
            return SpecifierSet(m.group(2))
    raise AssertionError(f"{name} not in pyproject dependencies")


def dockerfile_ray_version():
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile must start FROM rayproject/ray:<version>-py<XY>..."
    return m.group(1), (int(m.group(2)), int(m.group(3)))


def walk(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v, key)


def test_every_manifest_parses_with_kind_and_name():
    manifests = all_manifests()
    assert len(manifests) >= 10
    for path, d in manifests:
        assert d.get("apiVersion") and d.get("kind"), path
        assert d.get("metadata", {}).get("name"), path


def test_ray_versions_agree_with_the_image_and_pyproject():
    ray_version, py = dockerfile_ray_version()
    assert Version(ray_version) in project_spec("ray"), f"image Ray {ray_version} outside pyproject's ray spec"
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert Version(f"{py[0]}.{py[1]}") in requires
    ray_kinds = [(p, d) for p, d in all_manifests() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_kinds} == {"RayCluster", "RayJob", "RayCronJob"}
    for path, d in ray_kinds:
        versions = list(walk(d, "rayVersion"))
        assert versions and all(v == ray_version for v in versions), (path, versions)


def test_ray_pods_run_the_project_image_and_gpu_workers():
    for path, d in all_manifests():
        if not d["apiVersion"].startswith("ray.io/"):
            continue
        images = [c["image"] for c in walk(d, "containers") for c in c]
        assert images and all(i == images[0] and "/dpn:" in i for i in images), (path, images)
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for grp in walk(d, "workerGroupSpecs") for g in grp
                for c in g["template"]["spec"]["containers"]]
        assert gpus and all(gpus), path


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob", "CronJob"])
def test_jobs_run_the_pipeline(kind):
    found = [d for _, d in all_manifests() if d["kind"] == kind]
    assert len(found) == 1
    text = yaml.safe_dump(found[0])
    assert "dpn pipeline run" in text and "--recipe" in text
    if kind != "RayJob":
        assert "--trigger scheduled" in text
        assert found[0]["spec"]["schedule"].count(" ") == 4  # a 5-field cron expression
        assert found[0]["spec"]["concurrencyPolicy"] == "Forbid"


def test_mlflow_server_uses_postgres_s3_and_basic_auth_with_a_matching_version():
    deploy = next(d for _, d in all_manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    cmd = " ".join(c["args"])
    assert "--backend-store-uri \"postgresql+psycopg2://" in cmd
    assert "--artifacts-destination s3://" in cmd and "--app-name basic-auth" in cmd
    version = re.search(r":v(\d+\.\d+\.\d+)$", c["image"]).group(1)
    assert Version(version) in project_spec("mlflow")
    kinds = {d["kind"] + "/" + d["metadata"]["name"] for _, d in all_manifests()}
    assert {"StatefulSet/mlflow-postgres", "Service/mlflow", "Secret/mlflow-basic-auth"} <= kinds


def test_referenced_secrets_and_volumes_are_defined():
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in all_manifests()}
    for path, d in all_manifests():
        for ref in walk(d, "secretRef"):
            assert ("Secret", ref["name"]) in defined or ref["name"] == "dpn-ray-token", (path, ref)
        for claim in walk(d, "persistentVolumeClaim"):
            assert ("PersistentVolumeClaim", claim["claimName"]) in defined, (path, claim)
