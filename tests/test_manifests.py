"""manifests/: every kustomization builds, every object validates, and the wiring holds.

Core, apps and RBAC objects are checked against the Kubernetes 1.32 OpenAPI schemas in strict
mode (unknown fields fail). The InferenceService, a CRD, is read with the Kubernetes client's
deserializer into the kserve SDK's typed models and written back: a field the SDK does not know
(a typo) is dropped on the way, and the round trip reports it.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import yaml
from kserve_validation import validate_inference_service
from manifests_helpers import MANIFESTS, ROOT, kustomize, one

BASE = MANIFESTS / "base"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32"
ISVC_API = "serving.kserve.io/v1beta1"
# API groups whose schemas ship with kubernetes-validate ("" is the core group, apiVersion v1)
CORE_GROUPS = ("", "apps", "rbac.authorization.k8s.io", "batch", "networking.k8s.io", "policy")


# --------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return kustomize(MANIFESTS / "overlays" / "gpu")


def predictor_container(objects: list[dict]) -> dict:
    containers = one(objects, "InferenceService")["spec"]["predictor"]["containers"]
    assert len(containers) == 1, f"expected one predictor container, found {len(containers)}"
    return containers[0]


# --------------------------------------------------------------------------- validation


def validate(obj: dict) -> None:
    import kubernetes_validate

    name = f"{obj['kind']} {obj['metadata']['name']}"
    if obj["apiVersion"] == ISVC_API and obj["kind"] == "InferenceService":
        validate_inference_service(obj)
        return
    group = obj["apiVersion"].rpartition("/")[0]
    if group not in CORE_GROUPS:
        pytest.fail(f"{name} ({obj['apiVersion']}): no validator for this API; add one here")
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise AssertionError(
            f"{name} is invalid for Kubernetes {KUBERNETES_VERSION} at {where}: {exc.message}"
        ) from None


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kustomization_builds_and_every_object_validates(kustomization):
    objects = kustomize(kustomization)
    assert objects, f"{kustomization} builds to nothing"
    for obj in objects:
        validate(obj)
        assert obj["metadata"].get("namespace") == "fineserve", f"{obj['kind']} has no namespace"
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "fineserve", (
            f"{obj['kind']} {obj['metadata']['name']} lacks the common labels"
        )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.update(scaleTarge=p.pop("scaleTarget")), "predictor.scaleTarge"),
        (lambda p: p["containers"][0].update(arg=p["containers"][0].pop("args")), ".arg:"),
        (lambda p: p.update(minReplicas="1"), "predictor.minReplicas"),
        (lambda p: p["containers"][0].pop("name"), "name"),
    ],
    ids=["misspelled-field", "misspelled-container-field", "string-for-int", "missing-name"],
)
def test_inference_service_validation_catches_mistakes(base, mutate, expected):
    isvc = json.loads(json.dumps(one(base, "InferenceService")))
    mutate(isvc["spec"]["predictor"])
    with pytest.raises(AssertionError, match=expected.replace(".", r"\.")):
        validate_inference_service(isvc)


def test_core_validation_catches_a_misspelled_field(base):
    deployment = json.loads(json.dumps(one(base, "Deployment", "mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolice"):
        validate(deployment)


# --------------------------------------------------------------------------- the predictor


def test_predictor_runs_the_image_entrypoint_on_the_kserve_model_dir(base):
    isvc = one(base, "InferenceService")
    container = predictor_container(base)
    assert container["name"] == "kserve-container", (
        "KServe reads STORAGE_URI (and mounts /mnt/models) only for the `kserve-container`"
    )
    assert container.get("command") in (None, ["python", "-m", "fineserve.serving"]), (
        f"the predictor should use the image ENTRYPOINT (python -m serving): {container['command']}"
    )
    assert container["image"].split(":")[0] == _default_image().split(":")[0], (
        f"predictor image {container['image']} is not the fineserve image {_default_image()}"
    )
    args = container.get("args", [])
    assert "--model_dir=/mnt/models" in args, f"predictor args miss --model_dir=/mnt/models: {args}"
    assert f"--model_name={isvc['metadata']['name']}" in args, (
        "--model_name should be the InferenceService name, the name clients put in the URL"
    )
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    uri = env.get("STORAGE_URI", "")
    assert urlsplit(uri).scheme in ("s3", "gs", "pvc", "https", "hf"), (
        f"STORAGE_URI {uri!r} is not a URI the storage initializer downloads"
    )
    assert uri.rstrip("/").endswith("/artifacts/hf_model"), (
        "STORAGE_URI should be a model version's HF directory (<version>/artifacts/hf_model)"
    )


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_predictor_args_parse_with_the_serving_command_line(kustomization):
    """`python -m fineserve.serving` rejects unknown flags: a bad arg is a CrashLoopBackOff."""
    from fineserve.serving.entrypoint import build_parser

    container = predictor_container(kustomize(kustomization))
    args = container.get("args", [])
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"the predictor's command line rejects its args {args}") from exc
    assert parsed.model_dir == "/mnt/models"
    ports = [p["containerPort"] for p in container["ports"]]
    assert parsed.http_port in ports, f"serving listens on {parsed.http_port}, pod port {ports}"


def test_predictor_probes_use_the_v2_health_endpoints_on_the_served_port(base):
    container = predictor_container(base)
    ports = [p["containerPort"] for p in container["ports"]]
    assert ports == [8080], f"Knative allows one container port; KServe's HTTP is 8080: {ports}"
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        get = container.get(probe, {}).get("httpGet")
        assert get, f"predictor has no HTTP {probe}"
        assert get["path"] == path, f"{probe} hits {get['path']}, expected {path}"
        assert get["port"] == 8080, f"{probe} port {get['port']} is not the container port 8080"


def test_liveness_waits_for_a_load_that_compiles(base):
    """Load, probe and torch.compile take 30-90 s: the kubelet must not restart the pod."""
    container = predictor_container(base)
    startup = container.get("startupProbe", {})
    assert startup.get("httpGet", {}).get("path") == "/v2/health/live"
    allowed = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert allowed >= 180, f"the startup probe gives a loading model {allowed} s, not >= 180"


def test_predictor_has_resources_and_concurrency_autoscaling(base):
    predictor = one(base, "InferenceService")["spec"]["predictor"]
    resources = predictor_container(base)["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"predictor lacks {bound}"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"], (
        "need 1 <= minReplicas <= maxReplicas (0 would scale to zero and cold-start the model)"
    )
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0


def test_predictor_runs_non_root_without_privileges(base):
    security = predictor_container(base).get("securityContext", {})
    assert security.get("runAsNonRoot") is True
    assert security.get("allowPrivilegeEscalation") is False
    assert "ALL" in security.get("capabilities", {}).get("drop", [])


def test_gpu_overlay_requests_a_gpu_and_changes_only_the_predictor(base, gpu):
    container = predictor_container(gpu)
    assert container["resources"]["limits"].get("nvidia.com/gpu") == "1", (
        f"gpu overlay does not request nvidia.com/gpu: {container['resources']}"
    )
    assert "cuda" in container["image"].split(":")[-1], "gpu overlay should use the CUDA image"
    assert set(predictor_container(base)["args"]) < set(container["args"]), (
        "gpu overlay must keep the base predictor args and add to them"
    )
    others = [o for o in gpu if o["kind"] != "InferenceService"]
    assert others == [o for o in base if o["kind"] != "InferenceService"], (
        "gpu overlay should leave everything but the InferenceService as in base"
    )


# --------------------------------------------------------------------------- RBAC


def test_pipeline_service_account_may_deploy_inference_services(base):
    role = one(base, "Role", "fineserve-deployer")
    binding = next(
        b
        for b in base
        if b["kind"] == "RoleBinding" and b["roleRef"]["name"] == role["metadata"]["name"]
    )
    assert binding["roleRef"]["kind"] == "Role"
    account = one(base, "ServiceAccount", "fineserve-pipeline")
    subjects = [(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]]
    assert ("ServiceAccount", "fineserve-pipeline", account["metadata"]["namespace"]) in subjects, (
        f"RoleBinding {binding['metadata']['name']} does not bind fineserve-pipeline: {subjects}"
    )
    granted = {
        verb
        for rule in role["rules"]
        if "serving.kserve.io" in rule.get("apiGroups", [])
        and "inferenceservices" in rule.get("resources", [])
        for verb in rule["verbs"]
    }
    # exactly what the deploy step and `fineserve rollout` use (tests/test_deploy.py checks it
    # request by request against a fake API server)
    assert granted == {"get", "create", "update"}, f"granted on inferenceservices: {granted}"
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), f"Role {key} uses a wildcard: {rule}"
    assert "delete" not in granted, "the deploy step does not need to delete inferenceservices"


# --------------------------------------------------------------------------- MLflow


def _mlflow(base) -> tuple[dict, dict]:
    deployment = one(base, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "mlflow"]
    assert len(containers) == 1, "the mlflow Deployment needs one container named mlflow"
    return pod, containers[0]


def _flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg == name:
            return ""
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_mlflow_server_keeps_its_store_and_artifacts_on_the_pvc(base):
    pod, container = _mlflow(base)
    assert container["command"] == ["mlflow", "server"], container.get("command")
    assert container["image"] == predictor_container(base)["image"], (
        "MLflow runs from the fineserve image (it ships mlflow)"
    )
    args = container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvc_names = {o["metadata"]["name"] for o in base if o["kind"] == "PersistentVolumeClaim"}
    on_pvc = [
        path
        for name, path in mounts.items()
        if volumes[name].get("persistentVolumeClaim", {}).get("claimName") in pvc_names
    ]
    assert on_pvc, "MLflow mounts no PVC from this kustomization"
    backend = _flag(args, "--backend-store-uri") or ""
    assert backend.startswith("sqlite:////"), f"expected an absolute sqlite URI, got {backend!r}"
    path = backend.removeprefix("sqlite:///")
    assert any(path.startswith(m.rstrip("/") + "/") for m in on_pvc), (
        f"MLflow's sqlite store {path!r} is not on the PVC mounted at {on_pvc}"
    )
    # model versions must get plain s3:// sources KServe's storage initializer can download
    assert (_flag(args, "--default-artifact-root") or "").startswith("s3://")
    assert _flag(args, "--no-serve-artifacts") == "", "proxied artifacts are mlflow-artifacts:/"
    assert _flag(args, "--artifacts-destination") is None
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "fineserve-s3", "key": key}
    assert _flag(args, "--host") == "0.0.0.0", "MLflow must listen beyond localhost in a pod"
    assert one(base, "Deployment", "mlflow")["spec"]["strategy"]["type"] == "Recreate", (
        "two pods on one SQLite file / RWO volume during a rollout: use Recreate"
    )
    assert pod["securityContext"].get("runAsNonRoot") is True
    assert pod["securityContext"].get("fsGroup"), "without fsGroup the non-root user cannot write"


def test_mlflow_service_reaches_the_pod_and_matches_the_cluster_tracking_uri(base):
    pod, container = _mlflow(base)
    service = one(base, "Service", "mlflow")
    template_labels = one(base, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= template_labels.items(), "Service selector misses the MLflow pods"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert target in ports or target in ports.values(), f"targetPort {target} is not a pod port"
    assert ports.get(target, target) == int(_flag(container["args"], "--port") or 5000)

    from fineserve.core import defaults

    uri = getattr(defaults, "CLUSTER_TRACKING_URI", None)
    if uri is None:
        pytest.skip("fineserve.defaults has no CLUSTER_TRACKING_URI to compare with")
    url = urlsplit(uri)
    name, namespace = url.hostname.split(".")[:2]
    assert (name, namespace) == (service["metadata"]["name"], service["metadata"]["namespace"])
    assert url.port == service_port["port"], f"{uri} vs Service port {service_port['port']}"


def test_mlflow_accepts_the_in_cluster_host_headers_only(base):
    from mlflow.server.security_utils import is_allowed_host_header

    _, container = _mlflow(base)
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    service = one(base, "Service", "mlflow")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    for host in (
        f"{name}:{port}",
        f"{name}.{namespace}.svc:{port}",
        f"{name}.{namespace}.svc.cluster.local:{port}",
        "localhost:5000",  # kubectl port-forward
    ):
        assert is_allowed_host_header(allowed, host), f"MLflow would reject Host {host}"
    assert not is_allowed_host_header(allowed, "attacker.example.com"), "any Host is accepted"


# --------------------------------------------------------------------------- helpers


def _default_image() -> str:
    from fineserve.core.defaults import DEFAULT_IMAGE

    return DEFAULT_IMAGE


# --------------------------------------------------------------------------- modes and storage


@pytest.mark.parametrize(
    ("overlay", "mode", "metric"),
    [("serverless", "Serverless", "concurrency"), ("standard", "Standard", "cpu")],
)
def test_each_mode_overlay_sets_what_the_deploy_step_expects(overlay, mode, metric):
    from fineserve.core.inference_service import (
        MODE_ANNOTATION,
        MODEL_ANNOTATION,
        TAG_ROUTING_ANNOTATION,
        VERSION_LABEL,
        mode_of,
    )

    objects = kustomize(MANIFESTS / "overlays" / overlay)
    isvc = one(objects, "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    assert annotations[MODE_ANNOTATION] == mode and mode_of(isvc) == mode
    assert MODEL_ANNOTATION in annotations
    predictor = isvc["spec"]["predictor"]
    assert VERSION_LABEL in predictor["labels"]
    assert predictor["scaleMetric"] == metric
    if mode == "Standard":  # settings the mode ignores must not be there
        assert "canaryTrafficPercent" not in predictor and "containerConcurrency" not in predictor
        assert predictor["minReplicas"] >= 1
        assert TAG_ROUTING_ANNOTATION not in annotations
    else:
        assert annotations[TAG_ROUTING_ANNOTATION] == "true"
    assert one(objects, "Service", "minio") and one(objects, "Deployment", "minio")
    assert {o["metadata"].get("namespace") for o in objects} == {"fineserve"}


def test_the_predictor_downloads_with_the_storage_service_account(base):
    """KServe reads the S3 settings from the ServiceAccount's Secret, where MLflow writes.

    KServe's pkg/credentials/s3/utils.go (BuildS3EnvVars) reads the Secret's annotations;
    ServiceAccount annotations only beside eks.amazonaws.com/role-arn
    (pkg/credentials/service_account_credentials.go). tests/test_storage_real.py applies them
    to KServe's real pod mutator.
    """
    account = one(base, "ServiceAccount", "fineserve-storage")
    assert {"name": "fineserve-s3"} in account["secrets"]
    on_account = [k for k in account["metadata"].get("annotations") or {} if "s3" in k]
    assert not on_account, f"KServe ignores S3 annotations on a ServiceAccount: {on_account}"
    secret = one(base, "Secret", "fineserve-s3")
    assert "data" not in secret and "stringData" not in secret, "credentials are not in git"
    annotations = secret["metadata"]["annotations"]
    endpoint = annotations["serving.kserve.io/s3-endpoint"]
    scheme = "http" if annotations.get("serving.kserve.io/s3-usehttps") == "0" else "https"
    _, mlflow = _mlflow(base)
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert f"{scheme}://{endpoint}" == env["MLFLOW_S3_ENDPOINT_URL"], (
        "KServe downloads from another object store than MLflow writes to"
    )
    isvc = one(base, "InferenceService")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "fineserve-storage"


def test_the_cluster_workflow_applies_an_overlay_and_runs_the_cluster_suite():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "cluster.yml").read_text())
    steps = workflow["jobs"]["kind-kserve"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "kubectl apply -k manifests/overlays/standard" in commands
    assert "pytest -m cluster" in commands
    overlay = commands.split("manifests/overlays/")[1].split()[0]
    assert (MANIFESTS / "overlays" / overlay / "kustomization.yaml").exists()


# KServe's default `ingress.kserveIngressGateway` (config/configmap/inferenceservice.yaml): the
# Gateway its Standard-mode HTTPRoutes name as their parent
KSERVE_INGRESS_GATEWAY = ("kserve", "kserve-ingress-gateway")
# the fields of Gateway API v1 that the Gateway uses, each level strict (a typo fails)
GATEWAY_FIELDS = {
    "spec": {"gatewayClassName", "listeners"},
    "listener": {"name", "port", "protocol", "hostname", "allowedRoutes"},
    "allowedRoutes": {"namespaces", "kinds"},
    "namespaces": {"from", "selector"},
}


def test_the_gateway_for_standard_mode_canaries_is_the_one_kserve_routes_through():
    (gateway,) = kustomize(MANIFESTS / "kserve-gateway")
    assert (gateway["apiVersion"], gateway["kind"]) == ("gateway.networking.k8s.io/v1", "Gateway")
    meta = gateway["metadata"]
    assert (meta["namespace"], meta["name"]) == KSERVE_INGRESS_GATEWAY
    spec = gateway["spec"]
    assert set(spec) <= GATEWAY_FIELDS["spec"] and spec["gatewayClassName"]
    (listener,) = spec["listeners"]
    assert set(listener) <= GATEWAY_FIELDS["listener"]
    assert (listener["port"], listener["protocol"]) == (80, "HTTP")
    allowed = listener["allowedRoutes"]
    assert set(allowed) <= GATEWAY_FIELDS["allowedRoutes"]
    assert set(allowed["namespaces"]) <= GATEWAY_FIELDS["namespaces"]
    # KServe writes the HTTPRoutes in the InferenceService's namespace, not the Gateway's
    assert allowed["namespaces"]["from"] == "All"


def test_predictors_are_scraped_where_the_canary_analysis_reads_them(base):
    from fineserve.core.inference_service import SCRAPE_ANNOTATIONS

    predictor = one(base, "InferenceService")["spec"]["predictor"]
    assert predictor["annotations"] == SCRAPE_ANNOTATIONS
    port = predictor["containers"][0]["ports"][0]["containerPort"]
    assert SCRAPE_ANNOTATIONS["prometheus.io/port"] == str(port)
