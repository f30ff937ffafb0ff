"""Running on Kubeflow: the compiled package, its cluster plumbing, submit and schedule.

submit and schedule talk to an in-process fake of the KFP v2beta1 API over HTTP
(tests/kfp_fake.py), which checks every body against the kfp-server-api models.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_fake import FakeKFP

from fineserve.cli import main
from fineserve.core.errors import ParameterError
from fineserve.pipelines import kfp_api, kubeflow_config
from fineserve.pipelines.compile import compile_pipeline

IMAGE = "registry.example.com/fineserve:1.2.0"
TOKEN = "good-token"
CONFIG = {
    "namespace": "team-ml",
    "experiment": "retraining",
    "image": IMAGE,
    "service_account": "fineserve-pipeline",
    "image_pull_secrets": ["regcred"],
    "secrets": [
        {"name": "fineserve-s3", "keys": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"}},
        {"name": "hf-token", "keys": {"token": "HF_TOKEN"}, "steps": ["download", "train"],
         "optional": True},
    ],
    "cache_pvc": "fineserve-cache",
    "gpu_node_selector": {"nvidia.com/gpu.present": "true"},
    "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "timeouts": {"train": "6h", "download": 1800},
    "retries": {"train": 2},
}  # fmt: skip


# ------------------------------------------------------------------------------ compile


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "training.yaml"
    compile_pipeline(out, kubeflow=kubeflow_config.parse(CONFIG))
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_package_parses_strictly_as_a_pipeline_spec_named_and_versioned(compiled):
    spec, _ = compiled
    message = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # unknown: error
    assert message.pipeline_info.name == "fineserve-training"
    assert message.pipeline_info.display_name.startswith("fineserve training ")
    assert IMAGE in message.pipeline_info.description


def test_every_executor_runs_the_given_image_and_deploy_rolls_it_out(compiled):
    spec, _ = compiled
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    deploy = spec["components"]["comp-condition-1"]["dag"]["tasks"]["deploy"]
    assert deploy["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == IMAGE


def test_the_platform_spec_holds_the_cluster_plumbing(compiled):
    spec, executors = compiled
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every step
    for name, executor in executors.items():
        assert [s["secretName"] for s in executor["imagePullSecret"]] == ["regcred"], name
        secrets = {s["secretName"]: s for s in executor["secretAsEnv"]}
        assert secrets["fineserve-s3"]["keyToEnv"] == [
            {"secretKey": "AWS_ACCESS_KEY_ID", "envVar": "AWS_ACCESS_KEY_ID"}
        ]
        assert ("hf-token" in secrets) == (name in ("exec-download", "exec-train")), name
    train = executors["exec-train"]
    assert train["secretAsEnv"][1]["optional"] is True
    assert train["pvcMount"][0]["mountPath"] == "/cache"
    assert train["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == (
        "fineserve-cache"
    )
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert train["activeDeadlineSeconds"] == "21600"
    assert executors["exec-download"]["activeDeadlineSeconds"] == "1800"
    assert "nodeSelector" not in executors["exec-evaluate"]
    assert "pvcMount" not in executors["exec-gate"]
    # a retried train step resumes from the checkpoints on the volume
    root = spec["root"]
    assert root["inputDefinitions"]["parameters"]["checkpoint_dir"]["defaultValue"] == (
        "/cache/checkpoints"
    )
    train_task = root["dag"]["tasks"]["train"]
    assert train_task["retryPolicy"]["maxRetryCount"] == 2
    env = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in env


def test_compile_takes_the_image_from_the_flag(tmp_path, capsys):
    out = tmp_path / "t.yaml"
    main(["compile", "--image", "r.example/fs:9", "-o", str(out)])
    spec = yaml.safe_load(out.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "r.example/fs:9"
    }
    assert "image r.example/fs:9" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"hosts": "x"}, "unknown keys ['kubeflow.hosts']"),
        ({"namespace": "Team_ML"}, "kubeflow.namespace must be a DNS-1123 label"),
        ({"namespace": "team.ml"}, "kubeflow.namespace must be a DNS-1123 label"),
        ({"service_account": "SA"}, "kubeflow.service_account must be a Kubernetes object name"),
        ({"timeouts": {"train": "soon"}}, "kubeflow.timeouts.train must be a positive duration"),
        ({"timeouts": {"trian": 60}}, "kubeflow.timeouts: unknown step 'trian'"),
        ({"retries": {"train": "2"}}, "kubeflow.retries.train must be 0-10"),
        ({"secrets": [{"name": "s3"}]}, "kubeflow.secrets[0] needs `name` and `keys`"),
        ({"secrets": [{"name": "s3", "keys": {"k": "not an env"}}]}, "not an environment"),
        ({"gpu_tolerations": [{"effect": "Never"}]}, "gpu_tolerations[0].effect must be"),
        ({"image_pull_secrets": "regcred"}, "kubeflow.image_pull_secrets must be a list"),
        ("yes", "kubeflow must be a mapping"),
    ],
)
def test_a_bad_kubeflow_section_names_the_key(section, message):
    with pytest.raises(ParameterError) as err:
        kubeflow_config.parse(section)
    assert message in str(err.value)


# ------------------------------------------------------------------------------ cron


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("*/15 9-17 * * mon-fri", "0 */15 9-17 * * mon-fri"),
        ("30 0 3 1 * ?", "30 0 3 1 * ?"),
    ],
)
def test_unix_cron_becomes_the_six_fields_kfp_reads(given, sent):
    assert kfp_api.to_six_fields(given) == sent


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 25 * * *", "cron field 'hour': 25 is outside 0-23"),
        ("61 3 * * *", "cron field 'minute': 61 is outside 0-59"),
        ("0 3 0 * *", "cron field 'day of month': 0 is outside 1-31"),
        ("0 3 * 13 *", "cron field 'month': 13 is outside 1-12"),
        ("0 3 * * 7", "cron field 'day of week': 7 is outside 0-6"),
        ("0 3 * * funday", "'funday' is not a number or one of sun, mon"),
        ("0 3 * *", "has 4 fields: give five"),
        ("0 3 */0 * *", "step '0' must be a positive number"),
    ],
)
def test_a_bad_cron_names_the_field_and_its_range(cron, message):
    with pytest.raises(ParameterError) as err:
        kfp_api.to_six_fields(cron)
    assert message in str(err.value)


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 0 30 feb ?"])
def test_a_cron_that_never_fires_is_refused(cron):
    with pytest.raises(ParameterError) as err:
        kfp_api.to_six_fields(cron)
    assert str(err.value).startswith(
        f"cron {cron!r} never fires: no time matches it within 5 years, after which KFP's "
        "scheduler gives up"
    )


def test_a_cron_that_fires_rarely_or_on_either_day_field_is_accepted():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    assert kfp_api.next_runs(kfp_api.to_six_fields("0 0 29 2 *"), 2, now)[1].year == 2032
    # a day of month and a day of week both set: either fires (robfig/cron, as Unix cron)
    runs = kfp_api.next_runs(kfp_api.to_six_fields("0 0 30 2 mon"), 1, now)
    assert runs[0].isoformat() == "2027-02-01T00:00:00+00:00"
    assert kfp_api.next_runs("0 0 0 30 2 *", 3, now) == []  # listed with no next run, no error


def test_next_runs_of_daily_at_three():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    runs = kfp_api.next_runs("0 0 3 * * *", 2, now)
    assert [r.isoformat() for r in runs] == [
        "2026-12-02T03:00:00+00:00", "2026-12-03T03:00:00+00:00",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ submit, schedule


@pytest.fixture
def kfp():
    with FakeKFP(tokens={TOKEN: {"team-ml"}, "other-team": {"team-b"}}) as fake:
        yield fake


@pytest.fixture
def params_file(tmp_path, kfp):
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(
            {"epochs": 2, "model_name": "tweets", "kubeflow": {**CONFIG, "host": kfp.url}}
        )
    )
    return path


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)


def _package_spec(kfp: FakeKFP) -> dict:
    (version,) = kfp.versions.values()
    package = version["package"]
    text = package.decode() if isinstance(package, bytes) else package
    return next(yaml.safe_load_all(text))


def test_submit_uploads_a_version_and_starts_a_run_as_the_service_account(
    kfp, params_file, token, capsys
):
    main(["submit", "--params", str(params_file), "--run-name", "nightly-1"])
    out = capsys.readouterr().out
    (run,) = kfp.runs.values()
    assert run["display_name"] == "nightly-1"
    assert run["service_account"] == "fineserve-pipeline"
    assert run["runtime_config"]["parameters"] == {"epochs": 2.0, "model_name": "tweets"}
    (version,) = kfp.versions.values()
    assert run["pipeline_version_reference"] == {
        "pipeline_id": version["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    (experiment,) = kfp.experiments.values()
    assert (experiment["display_name"], experiment["namespace"]) == ("retraining", "team-ml")
    assert run["experiment_id"] == experiment["experiment_id"]
    # the uploaded package is the compiled pipeline with the image and the plumbing
    spec = _package_spec(kfp)
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        IMAGE
    }
    assert f"{kfp.url}/#/runs/details/{run['run_id']}" in out
    assert not [r for r in kfp.requests if r.code >= 400]


def test_a_second_submit_adds_a_version_to_the_same_pipeline(kfp, params_file, token):
    main(["submit", "--params", str(params_file)])  # creates the pipeline: its first version
    main(["submit", "--params", str(params_file), "--version-name", "v2"])
    assert len(kfp.pipelines) == 1
    names = [v["display_name"] for v in kfp.versions.values()]
    assert names == ["fineserve-training", "v2"]
    second = list(kfp.runs.values())[1]
    pinned = next(v for v in kfp.versions.values() if v["display_name"] == "v2")
    assert (
        second["pipeline_version_reference"]["pipeline_version_id"]
        == (pinned["pipeline_version_id"])
    )


def test_schedule_create_sends_six_fields_a_pinned_version_one_at_a_time_no_catchup(
    kfp, params_file, token, capsys
):
    main(["schedule", "create", "nightly", "--cron", "0 3 * * *", "--params", str(params_file)])
    out = capsys.readouterr().out
    (recurring,) = kfp.recurring_runs.values()
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(recurring["max_concurrency"]) == 1  # int64: a number or a string in JSON
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    assert recurring["service_account"] == "fineserve-pipeline"
    (version,) = kfp.versions.values()
    assert recurring["pipeline_version_reference"] == {
        "pipeline_id": version["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "cron '0 0 3 * * *' (six fields, seconds first" in out
    assert "next runs: " in out and " 03:00:00 UTC" in out


def test_schedule_list_disable_enable_delete(kfp, params_file, token, capsys):
    main(["schedule", "create", "every-6h", "--every", "6h", "--params", str(params_file)])
    (recurring,) = kfp.recurring_runs.values()
    assert int(recurring["trigger"]["periodic_schedule"]["interval_second"]) == 21600
    run_id = recurring["recurring_run_id"]
    capsys.readouterr()
    main(["schedule", "list", "--params", str(params_file)])
    listed = capsys.readouterr().out
    assert run_id in listed and "every-6h" in listed and "ENABLED" in listed
    main(["schedule", "disable", run_id, "--params", str(params_file)])
    assert kfp.recurring_runs[run_id]["status"] == "DISABLED"
    main(["schedule", "enable", run_id, "--params", str(params_file)])
    assert kfp.recurring_runs[run_id]["status"] == "ENABLED"
    main(["schedule", "delete", run_id, "--params", str(params_file)])
    assert kfp.recurring_runs == {}
    with pytest.raises(SystemExit) as exited:
        main(["schedule", "delete", run_id, "--params", str(params_file)])
    assert exited.value.code == 2


# ------------------------------------------------------------------------------ bad input


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_an_unreachable_host_is_reported_before_anything_is_created(tmp_path, token, capsys):
    from serving_helpers import free_port

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"kubeflow": {"host": f"http://127.0.0.1:{free_port()}"}}))
    err = _fails(["submit", "--params", str(params)], capsys)
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:" in err


@pytest.mark.parametrize(
    ("env_token", "namespace", "message"),
    [
        (None, "team-ml", "refused the token (HTTP 401): missing or expired; set $KF_PIPELINES"),
        ("expired", "team-ml", "refused the token (HTTP 401): missing or expired; get a fresh"),
        (TOKEN, "team-b", "namespace 'team-b' on KFP at"),
    ],
)
def test_bad_credentials_or_namespace_create_nothing(
    kfp, params_file, monkeypatch, capsys, env_token, namespace, message
):
    if env_token is None:
        monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    else:
        monkeypatch.setenv("KF_PIPELINES_TOKEN", env_token)
    err = _fails(["submit", "--params", str(params_file), "-n", namespace], capsys)
    assert message in err
    assert kfp.writes() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["schedule", "create", "x", "--cron", "0 25 * * *"], "'hour': 25 is outside 0-23"),
        (["schedule", "create", "x"], "exactly one of --cron and --every"),
        (["schedule", "create", "x", "--every", "soon"], "--every must be a positive duration"),
        (["submit", "-p", "epochz=3"], "unknown parameter 'epochz'; did you mean 'epochs'?"),
        (["submit", "-p", "epochs=many"], "parameter 'epochs' expects a number, got 'many'"),
        (["schedule", "create", "x", "--cron", "0 0 30 2 *"], "cron '0 0 30 2 *' never fires"),
        (["submit", "-p", "model_name=" + "m" * 10_000_000], "'model_name' is 10000000 char"),
        (["submit", "-p", "inference_service=Bad_Name!"], "'inference_service' must be a DNS-1035"),
        (["submit", "-p", "namespace=NOT A NS"], "parameter 'namespace' must be a DNS-1123 label"),
        (["submit", "-p", "predictor_memory=lots"], "'predictor_memory' must be a Kubernetes quan"),
        (["submit", "-p", "predictor_cpu_limit=1", "-p", "predictor_cpu=2"], "cpu request 2 is"),
        (["submit", "-p", "text_column=label"], "text_column and label_column are both 'label'"),
        (["submit", "-n", "NOT A NS"], "--namespace must be a DNS-1123 label"),
        (["schedule", "list", "-n", "NOT A NS"], "--namespace must be a DNS-1123 label"),
        (
            ["schedule", "create", "x", "--every", "6h", "-p", "inference_service=Bad_Name!"],
            "'inference_service' must be a DNS-1035 label",
        ),
    ],
)
def test_bad_input_is_refused_before_any_request(kfp, params_file, token, capsys, argv, message):
    err = _fails([*argv, "--params", str(params_file)], capsys)
    assert message in err
    assert kfp.requests == []


def test_a_params_file_with_an_unknown_key_is_refused_naming_it(kfp, tmp_path, token, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"epohcs": 2, "kubeflow": {"host": kfp.url}}))
    err = _fails(["submit", "--params", str(params)], capsys)
    assert "unknown parameter 'epohcs'" in err and kfp.requests == []


def test_compile_checks_the_whole_params_file(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"epochs": "many", "kubeflow": {"image": "r/fs:1"}}))
    err = _fails(["compile", "--params", str(params), "-o", str(tmp_path / "t.yaml")], capsys)
    assert "parameter 'epochs' expects a number, got 'many'" in err
    assert not (tmp_path / "t.yaml").exists()
