"""Deployment files (infra/): every manifest the kustomize overlays render validates against the real
schemas (Kubernetes core JSON schemas from `kubernetes-validate`, KubeRay v1.6.2's CRDs as a structural
schema in infra/schemas/), and the security invariants hold on the rendered output: token auth on every
Ray cluster, NetworkPolicy that admits only the intended peers, no literal secrets, MinIO root keys only
for MinIO, pinned images, non-root pods. Versions agree with pyproject.toml."""

from __future__ import annotations

import copy
import re
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml
from infra_manifests import (
    INFRA,
    K8S_VERSIONS,
    OVERLAYS,
    RAY_KINDS,
    ROOT,
    containers,
    pod_templates,
    ray_cluster_specs,
    render,
    validate,
    walk,
)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY($|_)|ACCESS_KEY", re.I)


def project_spec(name: str) -> SpecifierSet:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?\s*(.*)$", dep)
        if m:
            return SpecifierSet(m.group(2))
    raise AssertionError(f"{name} not in pyproject dependencies")


def dockerfile_ray_version() -> tuple[str, tuple[int, int]]:
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile must start FROM rayproject/ray:<version>-py<XY>..."
    return m.group(1), (int(m.group(2)), int(m.group(3)))


def by_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(overlay) if d["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in render(overlay) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (overlay, kind, name)
    return found[0]


# ----- schemas ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates_against_its_schema(overlay, k8s):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "NetworkPolicy", "Deployment", "StatefulSet",
            "Job", "Service", "ConfigMap", "PersistentVolumeClaim", "Namespace"} <= kinds
    errors = []
    for d in docs:
        try:
            validate(d, k8s)
        except jsonschema.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
    assert not errors, "\n".join(errors)


def _mutated(doc, path, value=None, delete=False):
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize("case", [
    # The fields the old raycronjob.yaml used: Kubernetes CronJob's, not RayCronJob's (v1.6.2: schedule,
    # jobTemplate, suspend).
    ("RayCronJob", ["spec", "concurrencyPolicy"], "Forbid"),
    ("RayCronJob", ["spec", "timeZone"], "Etc/UTC"),
    ("RayCronJob", ["spec", "successfulJobsHistoryLimit"], 3),
    ("RayCronJob", ["spec", "schedule"], None),
    ("RayCluster", ["spec", "authOptions", "mode"], "tokens"),
    ("RayCluster", ["spec", "headGroupSpec", "rayStartParam"], {}),
    ("RayCluster", ["spec", "workerGroupSpecs", 0, "replicas"], "1"),
    ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "containers", 0, "securityContext",
                    "runAsNonroot"], True),
    ("RayCluster", ["spec", "headGroupSpec", "template", "metadata", "generateName"], "x"),
    ("RayJob", ["spec", "submissionMode"], "K8sMode"),
    ("RayJob", ["spec", "deletionStrategy"], {"onSuccess": {"policy": "DeleteCluster"}}),
    ("Deployment", ["spec", "template", "spec", "containers", 0, "imagePullPolicy"], 3),
    ("CronJob", ["spec", "concurrencyPolicy"], 7),
    ("NetworkPolicy", ["spec", "podSelectors"], {}),
], ids=lambda c: f"{c[0]}:{'.'.join(map(str, c[1]))}")
def test_the_schemas_reject_what_the_api_server_rejects(case):
    """The validation above is not vacuous: a wrong field name, type or enum value is an error."""
    kind, path, value = case
    doc = by_kind("production", kind)[0]
    assert validate(doc, K8S_VERSIONS[-1]) is None
    with pytest.raises(jsonschema.ValidationError):
        validate(_mutated(doc, path, value, delete=value is None), K8S_VERSIONS[-1])


# ----- versions -----------------------------------------------------------------------------------------
def test_ray_versions_agree_with_the_image_and_pyproject():
    ray_version, py = dockerfile_ray_version()
    assert Version(ray_version) in project_spec("ray"), f"image Ray {ray_version} outside pyproject's ray spec"
    assert Version(f"{py[0]}.{py[1]}") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    for overlay in OVERLAYS:
        ray_docs = [d for d in render(overlay) if d["apiVersion"] == "ray.io/v1"]
        assert sorted(d["kind"] for d in ray_docs) == sorted(RAY_KINDS)
        for d in ray_docs:
            assert [c["rayVersion"] for c in ray_cluster_specs(d)] == [ray_version], d["metadata"]["name"]


def test_mlflow_server_image_is_pinned_and_matches_the_client():
    reqs = [Requirement(line) for line in (INFRA / "mlflow" / "requirements.txt").read_text().split("\n")
            if line and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), reqs
    pins = {r.name: next(iter(r.specifier)).version for r in reqs}
    assert set(pins) == {"mlflow", "psycopg2-binary", "boto3"}
    # basic auth needs the `auth` extra (Flask-WTF): without it the server refuses to start.
    assert next(r for r in reqs if r.name == "mlflow").extras == {"auth"}
    assert Version(pins["mlflow"]) in project_spec("mlflow")
    constraints = [line for line in (INFRA / "mlflow" / "constraints.txt").read_text().split("\n")
                   if line and not line.startswith("#")]
    locked = dict(line.split("==") for line in constraints)  # every line an exact pin
    assert all(locked[name] == version for name, version in pins.items())
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", dockerfile, re.M)
    assert "-c /tmp/mlflow/constraints.txt" in dockerfile
    for overlay in OVERLAYS:
        c = one(overlay, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        command = " ".join(c["command"] + c["args"])
        assert "pip" not in command and c["command"] == ["mlflow", "server"]
        assert "--app-name=basic-auth" in c["args"]
        assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in c["args"])


# ----- Ray: token auth, dashboard not exposed -------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_cluster_requires_a_token(overlay):
    ray_docs = [d for d in render(overlay) if d["apiVersion"] == "ray.io/v1"]
    assert len(ray_docs) == 3
    for d in ray_docs:
        for spec in ray_cluster_specs(d):
            assert spec["authOptions"]["mode"] == "token", d["metadata"]["name"]
            assert not spec["authOptions"].get("enableK8sTokenAuth")
            # KubeRay refuses token mode below Ray 2.52.
            assert Version(spec["rayVersion"]) >= Version("2.52.0")
    for d in render(overlay):
        for env in walk(d, "env"):
            for var in env:
                if var["name"] == "RAY_AUTH_MODE":
                    pytest.fail(f"{d['kind']}/{d['metadata']['name']} sets RAY_AUTH_MODE={var.get('value')}: "
                                f"leave it to authOptions")
    # The long-lived cluster's token is the Secret `dpn-ray-token` (key auth_token, KubeRay's contract),
    # which the scheduled submitter sends.
    cluster = one(overlay, "RayCluster", "dpn")
    assert cluster["spec"]["authOptions"]["secretName"] == "dpn-ray-token"
    submitter = one(overlay, "CronJob", "dpn-retrain-fallback")
    refs = [v["valueFrom"]["secretKeyRef"] for v in walk(submitter, "env") for v in v if v["name"] == "RAY_AUTH_TOKEN"]
    assert refs == [{"name": "dpn-ray-token", "key": "auth_token"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ray_dashboard_is_not_exposed_outside_the_namespace(overlay):
    for d in render(overlay):
        for spec in ray_cluster_specs(d):
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
        if d["kind"] == "Ingress":
            backends = {p["backend"]["service"]["name"] for r in d["spec"]["rules"] for p in r["http"]["paths"]}
            assert backends == {"mlflow"}, backends
            assert d["spec"]["tls"], "an Ingress must terminate TLS"


# ----- NetworkPolicy ----------------------------------------------------------------------------------
def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    assert not (selector or {}).get("matchExpressions"), "the evaluator below handles matchLabels only"
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def allowed(overlay: str, src: dict[str, str], dst: dict[str, str], port: int, src_namespace: str | None = None) -> bool:
    """Does NetworkPolicy let a pod labelled `src` (in `src_namespace`, default: ours) open TCP `port` on a
    pod labelled `dst` in our namespace? (Kubernetes semantics: allowed if no policy selects the pod for
    ingress, else if any rule of any selecting policy admits the peer and port.)"""
    namespace = next(d for d in render(overlay) if d["kind"] == "Namespace")["metadata"]["name"]
    src_ns = src_namespace or namespace
    ns_labels = {"kubernetes.io/metadata.name": src_ns}
    policies = [p for p in by_kind(overlay, "NetworkPolicy") if _matches(p["spec"]["podSelector"], dst)
                and "Ingress" in p["spec"]["policyTypes"]]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(pp.get("protocol", "TCP") == "TCP" and pp["port"] == port for pp in ports):
                continue
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:
                    ok = _matches(peer["namespaceSelector"], ns_labels)
                else:
                    ok = src_ns == namespace
                if ok and ("podSelector" not in peer or _matches(peer["podSelector"], src)):
                    return True
    return False


def pod_labels(overlay: str, where: str) -> dict[str, str]:
    """Labels of the pods of `where` (e.g. "RayCluster/dpn/head", "Deployment/mlflow")."""
    for d in render(overlay):
        for w, template in pod_templates(d):
            if w == where:
                return template["metadata"]["labels"]
    raise AssertionError(f"no pod template {where}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_intended_peers(overlay):
    head = pod_labels(overlay, "RayCluster/dpn/head")
    worker = pod_labels(overlay, "RayCluster/dpn/gpu")
    job_head = pod_labels(overlay, "RayJob/dpn-pipeline/head")
    job_submitter = pod_labels(overlay, "RayJob/dpn-pipeline/submitter")
    cron_worker = pod_labels(overlay, "RayCronJob/dpn-retrain/gpu")
    fallback = pod_labels(overlay, "CronJob/dpn-retrain-fallback")
    mlflow = pod_labels(overlay, "Deployment/mlflow")
    postgres = pod_labels(overlay, "StatefulSet/mlflow-postgres")
    minio = pod_labels(overlay, "Deployment/mlflow-minio")
    minio_setup = pod_labels(overlay, "Job/mlflow-minio-setup")
    stranger = {"app": "something-else"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    expect = [
        # a Ray cluster's own pods: any port (GCS 6379, raylets, object manager, workers)
        (worker, head, 6379, None, True), (head, worker, 43210, None, True), (worker, head, 8265, None, True),
        # submitters and the operator: the dashboard / job API only
        (fallback, head, 8265, None, True), (fallback, head, 6379, None, False),
        (job_submitter, job_head, 8265, None, True), (job_submitter, head, 8265, None, False),
        (operator, job_head, 8265, "kuberay-system", True), (operator, job_head, 6379, "kuberay-system", False),
        (operator, job_head, 8265, "elsewhere", False),
        # nobody else: other Ray clusters, MLflow, other pods of the namespace or other namespaces
        (cron_worker, head, 6379, None, False), (cron_worker, job_head, 8265, None, False),
        (mlflow, head, 8265, None, False), (stranger, head, 8265, None, False), (stranger, head, 6379, None, False),
        (head, head, 8265, "elsewhere", False),
        # MLflow: the pipeline's pods only
        (worker, mlflow, 5000, None, True), (cron_worker, mlflow, 5000, None, True), (head, mlflow, 5000, None, True),
        (stranger, mlflow, 5000, None, False), (fallback, mlflow, 5000, None, False),
        # the stores behind MLflow: MLflow (and MinIO's set-up Job) only; the pipeline goes through MLflow
        (mlflow, postgres, 5432, None, True), (worker, postgres, 5432, None, False),
        (mlflow, minio, 9000, None, True), (minio_setup, minio, 9000, None, True),
        (worker, minio, 9000, None, False), (stranger, minio, 9000, None, False), (mlflow, minio, 9001, None, False),
    ]
    wrong = [(s, d, port, ns, want) for s, d, port, ns, want in expect if allowed(overlay, s, d, port, ns) != want]
    assert not wrong, wrong
    # Every pod of the namespace is covered by some ingress policy (the default deny).
    for d in render(overlay):
        for where, template in pod_templates(d):
            labels = template["metadata"].get("labels", {})
            assert not allowed(overlay, stranger, labels, 1, "elsewhere"), where


# ----- secrets and credentials -----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_literal_secrets_in_any_manifest(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band (infra/README.md)"
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        for env in walk(d, "env"):
            for var in env:
                if SECRETISH.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), (name, var["name"])
        text = yaml.safe_dump(d)
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{name}: credentials in a URI"
        assert not re.search(r"(?i)password\s*[=:]\s*\S", "\n".join(
            v for v in walk(d, "data") for v in (v.values() if isinstance(v, dict) else [])
        )), f"{name}: a password in a ConfigMap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_root_credentials_go_to_minio_only_and_ray_pods_hold_no_storage_keys(overlay):
    users: dict[str, set[str]] = {}
    for d in render(overlay):
        for where, template in pod_templates(d):
            for ref in walk(template, "secretKeyRef"):
                users.setdefault(ref["name"], set()).add(where)
    assert users["mlflow-minio-root"] == {"Deployment/mlflow-minio", "Job/mlflow-minio-setup"}
    assert users["mlflow-s3"] == {"Deployment/mlflow", "Job/mlflow-minio-setup"}
    assert users["mlflow-postgres"] == {"StatefulSet/mlflow-postgres", "Deployment/mlflow"}
    assert users["mlflow-server"] == {"Deployment/mlflow"}
    ray_pods = {w for d in render(overlay) if d["apiVersion"] == "ray.io/v1" for w, _ in pod_templates(d)}
    assert users["dpn-mlflow-client"] == {w for w in ray_pods if not w.endswith("/submitter")}
    # The bucket policy MLflow's user gets: that one bucket, nothing else.
    policy = next(d for d in render(overlay) if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("mlflow-minio-setup"))["data"]["minio-policy.json"]
    resources = {r for s in yaml.safe_load(policy)["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::mlflow-artifacts", "arn:aws:s3:::mlflow-artifacts/*"}


def test_every_secret_the_manifests_read_is_created_in_the_readme():
    readme = (INFRA / "README.md").read_text()
    created = {}
    literal = r'--from-literal=[^=\s]+=(?:"[^"]*"|\S+)'
    for m in re.finditer(rf"kubectl -n \S+ create secret generic (\S+)((?:\s*\\?\s*{literal})+)", readme):
        created[m.group(1)] = set(re.findall(r"--from-literal=([^=\s]+)=", m.group(2)))
    for overlay in OVERLAYS:
        for d in render(overlay):
            for ref in walk(d, "secretKeyRef"):
                assert ref["key"] in created.get(ref["name"], set()), f"README does not create {ref}"
            for spec in ray_cluster_specs(d):
                name = spec["authOptions"].get("secretName")
                assert name is None or "auth_token" in created.get(name, set())


# ----- images, pod security --------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay):
    version = PYPROJECT["project"]["version"]
    images = set()
    for d in render(overlay):
        for _, template in pod_templates(d):
            images |= {c["image"] for c in containers(template)}
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"{image}: no explicit tag"
        if name.endswith(("/dpn", "/dpn-mlflow")) or name in ("dpn", "dpn-mlflow"):
            assert tag == version, f"{image}: project images carry the project version {version}"
        else:  # third-party: an exact release (PostgreSQL's are major.minor), not a floating major tag
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?(-[\w.]+)?|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_without_privileges(overlay):
    docs = render(overlay)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    seen = 0
    for d in docs:
        for where, template in pod_templates(d):
            spec = template["spec"]
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
            assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
            for c in containers(template):
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
                assert "ALL" in sc.get("capabilities", {}).get("drop", []), (where, c["name"])
                assert not sc.get("capabilities", {}).get("add") and not sc.get("privileged"), (where, c["name"])
                # Every process here tolerates a read-only root (writable paths are emptyDir volumes).
                assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
                seen += 1
        # KubeRay's own autoscaler sidecar takes its securityContext from autoscalerOptions.
        for spec in ray_cluster_specs(d):
            if spec.get("enableInTreeAutoscaling"):
                sc = spec["autoscalerOptions"]["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert seen >= 12


# ----- overlays, schedules, the pipeline ---------------------------------------------------------------
def _gpus(overlay: str) -> list[str]:
    return [c["resources"]["limits"].get("nvidia.com/gpu", "0") for d in render(overlay)
            for spec in ray_cluster_specs(d) for g in spec.get("workerGroupSpecs", [])
            for c in g["template"]["spec"]["containers"]]


def test_overlays_set_namespace_images_and_node_shapes():
    for overlay, namespace, image in (("local", "dpn-local", "dpn:"), ("production", "dpn", "ghcr.io/dpn-project/dpn:")):
        docs = render(overlay)
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [namespace]
        ray_images = {c["image"] for d in docs if d["apiVersion"] == "ray.io/v1" for _, t in pod_templates(d)
                      for c in containers(t)}
        assert all(i.startswith(image) for i in ray_images), ray_images
    assert _gpus("local") == ["0"] * 3
    assert _gpus("production") == ["8"] * 3
    assert one("local", "RayCronJob", "dpn-retrain")["spec"]["suspend"] is True
    assert one("production", "RayCronJob", "dpn-retrain")["spec"]["suspend"] is False
    # One schedule at a time: the CronJob fallback stays suspended while the RayCronJob is the schedule.
    for overlay in OVERLAYS:
        assert one(overlay, "CronJob", "dpn-retrain-fallback")["spec"]["suspend"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_jobs_share_one_work_dir_and_never_overlap_silently(overlay):
    """Overlap protection: the CronJob fallback forbids concurrency; RayCronJob has no such field, so
    every pipeline run uses the same --work-dir on the shared volume, where the pipeline's work-dir lock
    makes a second run exit at once."""
    rayjob = one(overlay, "RayJob", "dpn-pipeline")["spec"]
    cron = one(overlay, "RayCronJob", "dpn-retrain")["spec"]
    fallback = one(overlay, "CronJob", "dpn-retrain-fallback")["spec"]
    fallback_cmd = " ".join(fallback["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    commands = {"RayJob": rayjob["entrypoint"], "RayCronJob": cron["jobTemplate"]["entrypoint"],
                "CronJob": fallback_cmd}
    work_dirs = {k: re.search(r"--work-dir (\S+)", v).group(1) for k, v in commands.items()}
    assert len(set(work_dirs.values())) == 1 and work_dirs["RayJob"].startswith("/data/"), work_dirs
    assert "dpn pipeline run" in commands["RayJob"] and "--trigger manual" in commands["RayJob"]
    assert "--trigger scheduled" in commands["RayCronJob"] and "--trigger scheduled" in fallback_cmd
    assert fallback["concurrencyPolicy"] == "Forbid" and fallback["timeZone"] == "Etc/UTC"
    # robfig/cron (KubeRay's parser) with an explicit UTC zone, then the 5 standard fields.
    assert re.fullmatch(r"CRON_TZ=UTC( \S+){5}", cron["schedule"]), cron["schedule"]
    assert cron["schedule"].split(" ", 1)[1] == fallback["schedule"]
    # Submitted with a stable per-week id, following the job (a retried pod attaches, never re-submits).
    assert "--submission-id \"dpn-retrain-$(date -u +%G-W%V)\"" in fallback_cmd and "--follow" in fallback_cmd
    # Every Ray pod mounts the shared volume that holds the work dir.
    for d in render(overlay):
        for spec in ray_cluster_specs(d):
            for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
                claims = {v["persistentVolumeClaim"]["claimName"] for v in t["spec"]["volumes"]
                          if "persistentVolumeClaim" in v}
                assert claims == {"dpn-data"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_and_volume_claims_exist(overlay):
    docs = render(overlay)
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        for ref in walk(d, "configMap"):
            assert ("ConfigMap", ref["name"]) in defined, ref
        for claim in walk(d, "persistentVolumeClaim"):
            assert ("PersistentVolumeClaim", claim["claimName"]) in defined, claim
    for d in docs:
        for where, template in pod_templates(d):
            volumes = {v["name"] for v in template["spec"].get("volumes", [])}
            volumes |= {c["metadata"]["name"] for c in d["spec"].get("volumeClaimTemplates", [])}
            for c in containers(template):
                missing = {m["name"] for m in c.get("volumeMounts", [])} - volumes
                assert not missing, (where, c["name"], missing)
