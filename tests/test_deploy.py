"""Deploy and rollout against a fake Kubernetes API (real HTTP) and KServe's emulated controller.

The registry is a real `mlflow server`. Every flow runs in both KServe modes: first deploy,
canary, re-run, promote, rollback, a canary that never gets ready, a concurrent writer, and
bad input that must leave the cluster and the registry as they were.
"""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow import MlflowClient
from scripted_prometheus import ScriptedPrometheus

from fineserve.components.decorator import call_component
from fineserve.components.deploy import deploy
from fineserve.core import canary_analysis, rollout
from fineserve.core.artifacts import CHAMPION, PREVIOUS, TAG_STORAGE_URI
from fineserve.core.cluster import Cluster
from fineserve.core.errors import ClusterError, ParameterError, RegistryError
from fineserve.core.inference_service import (
    GROUP,
    PLURAL,
    VERSION_LABEL,
    read_rollout,
)

MODES = ["Serverless", "Standard"]
NAMESPACE = "fineserve"
ISVC = "fineserve"


@pytest.fixture
def registry(mlflow_server, request):
    """A fresh registered model with versions 1-4 stored at s3:// locations."""
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = f"deploy-{uuid.uuid4().hex[:12]}"
    client.create_registered_model(name)
    for version in range(1, 5):
        client.create_model_version(
            name,
            f"s3://models/{name}/v{version}",
            tags={TAG_STORAGE_URI: f"s3://models/{name}/v{version}/artifacts/hf_model"},
        )
    return client, name, mlflow_server


@pytest.fixture
def kube(fake_kube, kserve_controller, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(fake_kube.kubeconfig(tmp_path / "kubeconfig")))
    return fake_kube


def run_deploy(registry, version, mode, **params):
    client, name, uri = registry
    report = params.pop("report", None)
    arguments = {
        "model_name": name,
        "model_version": str(version),
        "tracking_uri": uri,
        "kube_context": "fake",
        "deployment_mode": mode,
        "image": "registry.example/fineserve:test",
        "ready_timeout": 5,
        **params,
    }
    result = call_component(deploy, report=report or _scratch_report(), **arguments)
    return result.outputs


def _scratch_report() -> str:
    import tempfile

    return tempfile.mktemp(suffix=".md")


def isvc(kube) -> dict:
    return kube.get(GROUP, "v1beta1", PLURAL, NAMESPACE, ISVC)


def served(kube) -> rollout.Rollout:
    kube.wait_idle()
    return read_rollout(isvc(kube))


def aliases(registry) -> dict:
    client, name, _ = registry
    return rollout.aliases_of(client, name)


@pytest.mark.parametrize("mode", MODES)
def test_first_deploy_serves_all_traffic_and_makes_the_version_champion(
    kube, registry, mode, tmp_path
):
    action, message = run_deploy(registry, 1, mode, report=str(tmp_path / "report.md"))
    assert action == "created", message
    state = served(kube)
    assert state.mode == mode and state.ready
    assert (state.stable.version, state.stable.percent, state.canary) == ("1", 100, None)
    assert aliases(registry)[CHAMPION] == "1"
    obj = isvc(kube)
    container = obj["spec"]["predictor"]["containers"][0]
    assert {
        "name": "STORAGE_URI",
        "value": f"s3://models/{registry[1]}/v1/artifacts/hf_model",
    } in container["env"]
    # the predictor answers (metadata, /metrics) as the MLflow version it serves
    assert {"name": "FINESERVE_MODEL_VERSION", "value": "1"} in container["env"]
    assert container["image"] == "registry.example/fineserve:test"
    assert obj["spec"]["predictor"]["labels"][VERSION_LABEL] == "1"
    assert obj["spec"]["predictor"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "**created**" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_next_version_is_a_canary_and_a_rerun_changes_nothing(kube, registry, mode):
    run_deploy(registry, 1, mode)
    action, message = run_deploy(registry, 2, mode, canary_percent=20)
    assert action == "canary", message
    state = served(kube)
    assert (state.stable.version, state.stable.percent) == ("1", 80)
    assert (state.canary.version, state.canary.percent, state.canary.ready) == ("2", 20, True)
    assert aliases(registry)[CHAMPION] == "1", "a canary is not the champion"
    if mode == "Serverless":
        traffic = isvc(kube)["status"]["components"]["predictor"]["traffic"]
        assert sorted((t["tag"], t["percent"]) for t in traffic) == [("latest", 20), ("prev", 80)]
    else:
        (canary,) = isvc(kube)["status"]["canaryStatuses"]
        assert (canary["trafficPercent"], canary["ready"]) == (20, True)

    before = isvc(kube)["metadata"]["resourceVersion"]
    kube.clear_requests()
    action, _ = run_deploy(registry, 2, mode, canary_percent=20)
    assert action == "unchanged"
    assert {r.verb for r in kube.requests} == {"get"}, "a re-run must not write"
    assert isvc(kube)["metadata"]["resourceVersion"] == before


@pytest.mark.parametrize("mode", MODES)
def test_promote_moves_traffic_and_aliases(kube, registry, mode):
    client, name, _ = registry
    run_deploy(registry, 1, mode)
    run_deploy(registry, 2, mode)
    rollout.promote(Cluster(context="fake"), ISVC, client)
    state = served(kube)
    assert (state.stable.version, state.stable.percent, state.canary) == ("2", 100, None)
    assert state.ready
    assert aliases(registry)[CHAMPION] == "2" and aliases(registry)[PREVIOUS] == "1"
    with pytest.raises(ClusterError, match="no canary in flight, nothing to promote"):
        rollout.promote(Cluster(context="fake"), ISVC, client)


@pytest.mark.parametrize("mode", MODES)
def test_set_and_rollback_keep_the_champion(kube, registry, mode):
    run_deploy(registry, 1, mode)
    run_deploy(registry, 2, mode)
    cluster = Cluster(context="fake")
    rollout.set_traffic(cluster, ISVC, 50)
    state = served(kube)
    assert (state.stable.percent, state.canary.percent) == (50, 50)
    rollout.rollback(cluster, ISVC)
    state = served(kube)
    assert state.served_version == "1"
    assert aliases(registry)[CHAMPION] == "1"
    if mode == "Serverless":
        traffic = {
            t["tag"]: t["percent"]
            for t in isvc(kube)["status"]["components"]["predictor"]["traffic"]
        }
        assert traffic == {"latest": 0, "prev": 100}
    else:
        assert "canary" not in isvc(kube)["spec"]
    with pytest.raises(ClusterError, match="nothing to roll back"):
        rollout.rollback(cluster, ISVC)
    # after a rollback the next version is a canary beside the same stable one
    action, _ = run_deploy(registry, 3, mode)
    state = served(kube)
    assert action == "canary" and (state.stable.version, state.canary.version) == ("1", "3")


@pytest.mark.parametrize("mode", MODES)
def test_a_canary_that_never_gets_ready_is_rolled_back_with_the_reason(
    kube, kserve_controller, registry, mode
):
    run_deploy(registry, 1, mode)
    kserve_controller.ready = lambda predictor: (
        "Back-off pulling image" if predictor["labels"][VERSION_LABEL] == "2" else True
    )
    with pytest.raises(ClusterError) as failure:
        run_deploy(registry, 2, mode, ready_timeout=1)
    message = str(failure.value)
    assert "canary v2" in message and "Back-off pulling image" in message
    assert "rolled back: all traffic on v1" in message
    state = served(kube)
    assert state.served_version == "1"
    assert aliases(registry)[CHAMPION] == "1"


@pytest.mark.parametrize("mode", MODES)
def test_a_concurrent_writer_is_kept_not_overwritten(kube, registry, mode, monkeypatch):
    run_deploy(registry, 1, mode)
    original = Cluster.replace
    interfered = []

    def replace_after_someone_else(self, body):
        if not interfered:  # another writer changes the object between our read and our write
            theirs = isvc(kube)
            theirs["metadata"].setdefault("labels", {})["team"] = "search"
            kube.put(theirs)
            interfered.append(True)
        return original(self, body)

    monkeypatch.setattr(Cluster, "replace", replace_after_someone_else)
    kube.clear_requests()
    action, _ = run_deploy(registry, 2, mode)
    assert action == "canary"
    assert [r.code for r in kube.requests if r.verb == "update"][:2] == [409, 200]
    obj = isvc(kube)
    assert obj["metadata"]["labels"]["team"] == "search", "the other writer's change was lost"
    assert read_rollout(obj).canary.version == "2"


def snapshot(kube, registry) -> tuple:
    obj = isvc(kube)
    return (obj or {}).get("metadata", {}).get("resourceVersion"), aliases(registry)


@pytest.mark.parametrize("mode", MODES)
def test_bad_input_is_refused_and_changes_nothing(kube, registry, mode):
    client, name, uri = registry
    run_deploy(registry, 1, mode)
    run_deploy(registry, 2, mode)
    before = snapshot(kube, registry)
    cluster = Cluster(context="fake")
    with pytest.raises(ParameterError, match="0 to 100"):
        rollout.set_traffic(cluster, ISVC, 101)
    with pytest.raises(ClusterError, match="'nope' not found in namespace 'fineserve'"):
        rollout.status(cluster, "nope", client)
    with pytest.raises(ClusterError, match="canary v2 at 10% in flight: promote or roll it back"):
        run_deploy(registry, 3, mode)
    with pytest.raises(RegistryError):
        run_deploy(registry, 9, mode)  # no such version
    client.set_model_version_tag(name, "3", TAG_STORAGE_URI, "mlflow-artifacts:/1/x/hf_model")
    with pytest.raises(RegistryError, match="KServe cannot read the model location"):
        run_deploy(registry, 3, mode)
    other_mode = "Standard" if mode == "Serverless" else "Serverless"
    with pytest.raises(ClusterError, match="cannot switch a live InferenceService's mode"):
        run_deploy(registry, 4, other_mode)
    assert snapshot(kube, registry) == before


def test_settings_a_mode_ignores_are_refused_before_anything_is_sent(kube, registry):
    kube.clear_requests()
    for params, problem in [
        ({"scale_metric": "concurrency"}, "HPA on cpu or memory only"),
        ({"min_replicas": 0}, "cannot scale to zero"),
        ({"container_concurrency": 4}, "ignored in Standard mode"),
        ({"predictor_cpu": "3", "predictor_cpu_limit": "2"}, "above its limit"),
    ]:
        with pytest.raises(ParameterError, match=problem):
            run_deploy(registry, 1, "Standard", **params)
    with pytest.raises(ParameterError, match="not a KServe mode"):
        run_deploy(registry, 1, "Raw")
    assert kube.requests == []


def test_promote_with_a_registry_missing_the_version_changes_nothing(kube, registry):
    client, name, _ = registry
    run_deploy(registry, 1, "Serverless")
    run_deploy(registry, 2, "Serverless")
    client.delete_model_version(name, "2")
    before = snapshot(kube, registry)
    with pytest.raises(RegistryError, match="MLflow has no version 2"):
        rollout.promote(Cluster(context="fake"), ISVC, client)
    assert snapshot(kube, registry) == before


def test_missing_permission_is_a_clear_error(
    fake_kube, kserve_controller, registry, tmp_path, monkeypatch
):
    path = fake_kube.kubeconfig(
        tmp_path / "kubeconfig", user="system:serviceaccount:fineserve:fineserve-pipeline"
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(
        ClusterError, match=r"HTTP 403: .*forbidden.*see the Role in manifests/base"
    ):
        run_deploy(registry, 1, "Serverless")


def test_rollout_status_table_json_and_a_stale_champion(kube, registry, capsys):
    from fineserve.cli import main

    client, name, uri = registry
    run_deploy(registry, 1, "Serverless")
    run_deploy(registry, 2, "Serverless")
    kube.wait_idle()
    main(["rollout", "status", ISVC, "--context", "fake", "--tracking-uri", uri])
    table = capsys.readouterr().out
    assert "Serverless mode" in table and "Ready" in table
    assert "stable  fineserve-predictor-00001" in table and "90%" in table
    assert "canary  fineserve-predictor-00002" in table and "10%" in table
    assert "champion v1" in table and "WARNING" not in table

    # promoted with kubectl alone: MLflow's champion is now wrong, and status says so
    obj = isvc(kube)
    del obj["spec"]["predictor"]["canaryTrafficPercent"]
    kube.put(obj)
    kube.wait_idle()
    main(["rollout", "status", ISVC, "--context", "fake", "--tracking-uri", uri, "-o", "json"])
    status = json.loads(capsys.readouterr().out)
    assert status["served_version"] == "2" and status["aliases"]["champion"] == "1"
    assert "serves v2 to all traffic but MLflow's champion is v1" in status["disagreement"]


def test_the_gate_compares_against_what_the_cluster_serves(kube, registry):
    from fineserve.components.gate import current_champion

    client, name, _ = registry
    run_deploy(registry, 1, "Serverless")
    run_deploy(registry, 2, "Serverless")
    obj = isvc(kube)
    del obj["spec"]["predictor"]["canaryTrafficPercent"]  # promoted with kubectl
    kube.put(obj)
    kube.wait_idle()
    version, note = current_champion(
        client, name, inference_service=ISVC, namespace="", kube_context="fake"
    )
    assert version == "2" and "champion moved to v2" in note
    assert aliases(registry)[CHAMPION] == "2" and aliases(registry)[PREVIOUS] == "1"
    assert current_champion(
        client, name, inference_service=ISVC, namespace="", kube_context="fake"
    ) == ("2", "")


def test_local_run_without_a_cluster_skips_deploy(registry, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    action, message = run_deploy(registry, 1, "Serverless", kube_context="")
    assert action == "skipped" and "kube_context" in message


# --------------------------------------------------------------------------- kubectl, README


def readme_kubectl(mode: str) -> dict[str, str]:
    """The README's kubectl commands for ``mode``, by their trailing comment (shift, promote...)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split(f"<!-- kubectl:{mode.lower()} -->", 1)[1].split("```bash\n", 1)[1]
    commands = {}
    for line in block.split("```", 1)[0].strip().splitlines():
        command, _, comment = line.partition("   # ")
        key = re.match(r"\w+", comment.strip()).group(0)
        commands[key] = shlex.split(command)
    return commands


def kubectl(argv: list[str]) -> str:
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_the_readme_kubectl_commands_do_what_they_say(kube, registry, mode):
    commands = readme_kubectl(mode)
    assert set(commands) == {"status", "traffic", "shift", "promote", "rollback"}
    run_deploy(registry, 1, mode)
    run_deploy(registry, 2, mode)
    kube.wait_idle()
    assert "True" in kubectl(commands["status"])
    assert "10" in kubectl(commands["traffic"])

    kubectl(commands["shift"])
    state = served(kube)
    assert (state.stable.version, state.stable.percent) == ("1", 50)
    assert (state.canary.version, state.canary.percent) == ("2", 50)

    kubectl(commands["promote"])
    state = served(kube)
    assert state.served_version == "2" and state.canary is None and state.ready

    run_deploy(registry, 3, mode)
    kubectl(commands["rollback"])
    state = served(kube)
    assert state.served_version == "2"
    if mode == "Serverless":
        traffic = isvc(kube)["status"]["components"]["predictor"]["traffic"]
        assert {t["revisionName"]: t["percent"] for t in traffic} == {
            state.stable.name: 100,
            state.canary.name: 0,
        }


# --------------------------------------------------------------------------- least privilege

PIPELINE_USER = "system:serviceaccount:fineserve:fineserve-pipeline"


def pipeline_role() -> tuple[dict, dict]:
    import shutil
    import subprocess
    from pathlib import Path

    import yaml

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    base = Path(__file__).resolve().parent.parent / "manifests" / "base"
    built = subprocess.run(
        ["kubectl", "kustomize", str(base)], capture_output=True, text=True, check=True
    ).stdout
    objects = [o for o in yaml.safe_load_all(built) if o]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    (binding,) = [
        o
        for o in objects
        if o["kind"] == "RoleBinding" and o["roleRef"]["name"] == role["metadata"]["name"]
    ]
    return role, binding


def allowed(role: dict, request) -> bool:
    for rule in role["rules"]:
        resources = rule.get("resources", [])
        resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
        if (
            request.api_group in rule.get("apiGroups", [])
            and (resource in resources or "*" in resources)
            and (request.verb in rule["verbs"] or "*" in rule["verbs"])
            and (not rule.get("resourceNames") or request.name in rule["resourceNames"])
        ):
            return True
    return False


@pytest.mark.parametrize("mode", MODES)
def test_the_role_in_manifests_allows_exactly_what_deploy_rollout_and_analysis_use(
    fake_kube, kserve_controller, registry, mode, tmp_path, monkeypatch
):
    client, name, uri = registry
    role, binding = pipeline_role()
    for obj in (role, binding):
        fake_kube.put({**obj, "metadata": {**obj["metadata"], "namespace": NAMESPACE}})
    path = fake_kube.kubeconfig(tmp_path / "kubeconfig", user=PIPELINE_USER)
    monkeypatch.setenv("KUBECONFIG", str(path))
    fake_kube.clear_requests()

    from fineserve.components.gate import current_champion

    run_deploy(registry, 1, mode)  # create, wait
    run_deploy(registry, 2, mode)  # canary
    run_deploy(registry, 2, mode)  # re-run: unchanged
    cluster = Cluster(context="fake")
    rollout.status(cluster, ISVC, client)
    rollout.set_traffic(cluster, ISVC, 40)
    rollout.promote(cluster, ISVC, client)
    current_champion(client, name, inference_service=ISVC, namespace="", kube_context="fake")
    run_deploy(registry, 3, mode)
    # the canary analysis: one step up, the lease taken and renewed, then Ctrl-C
    script = ScriptedPrometheus([{}, KeyboardInterrupt()])
    outcome = canary_analysis.analyze(
        cluster, ISVC, script, client, canary_analysis.Settings(interval=1.0),
        report=lambda _: None, sleep=script.advance,
    )  # fmt: skip
    assert outcome.result == "interrupted"
    rollout.rollback(cluster, ISVC)
    kserve_controller.ready = lambda predictor: "CrashLoopBackOff"
    with pytest.raises(ClusterError, match="rolled back"):
        run_deploy(registry, 4, mode, ready_timeout=1)

    used = [r for r in fake_kube.requests if r.user == PIPELINE_USER]
    assert used and not [r for r in used if r.code in (401, 403)]
    refused = [f"{r.verb} {r.resource}" for r in used if not allowed(role, r)]
    assert not refused, f"requests the Role does not allow: {refused}"
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    exercised = {(r.api_group, r.resource, r.verb) for r in used}
    assert granted - exercised == set(), (
        f"the Role grants what is never used: {granted - exercised}"
    )
