"""The compiled DAG and the command-line parameters."""

import subprocess
import sys

import pytest
import yaml

from fineserve.components import (
    canary_analysis,
    deploy,
    download,
    evaluation,
    gate,
    registration,
    tokenization,
    training,
)
from fineserve.core.errors import ParameterError
from fineserve.pipelines.parameters import (
    load_params_file,
    local_run_arguments,
    parse_assignments,
    validate,
)
from fineserve.pipelines.training_pipeline import training_pipeline

TASKS = {"download", "tokenize", "train", "evaluate", "register", "gate"}
#: Steps that read state outside their inputs (the champion, the cluster): never cached.
UNCACHED = {"gate", "deploy", "analyze-canary"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ir") / "training.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "fineserve", "compile", "-o", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "upload it in the Kubeflow UI" in result.stdout
    return yaml.safe_load(out.read_text())


def test_dag_runs_the_steps_in_order_and_deploys_only_when_the_gate_passes(compiled):
    tasks = compiled["root"]["dag"]["tasks"]
    assert set(tasks) == TASKS | {"condition-1"}
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps == {
        "download": set(),
        "tokenize": {"download"},
        "train": {"tokenize"},
        "evaluate": {"download", "train"},
        "register": {"evaluate", "train"},
        "gate": {"download", "evaluate", "register"},
        "condition-1": {"gate", "register"},
    }
    condition = tasks["condition-1"]
    assert condition["taskInfo"]["name"] == "gate-passed"
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--gate-passed'] == true"
    )
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"deploy", "condition-2"}
    version = inner["deploy"]["inputs"]["parameters"]["model_version"]
    assert version["componentInputParameter"] == "pipelinechannel--register-model_version"
    # the canary analysis: only when switched on, and only when deploy started a canary
    assert inner["condition-2"]["dependentTasks"] == ["deploy"]
    assert inner["condition-2"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--canary_analysis'] == true"
    )
    started = compiled["components"]["comp-condition-2"]["dag"]["tasks"]["condition-3"]
    assert started["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--deploy-action'] == 'canary'"
    )
    analysis = compiled["components"]["comp-condition-3"]["dag"]["tasks"]
    assert set(analysis) == {"analyze-canary"}
    every = {**tasks, **inner, **analysis}
    for name, task in every.items():
        if name in TASKS - UNCACHED:
            assert task["cachingOptions"].get("enableCache"), name
        elif name in UNCACHED:
            assert not task["cachingOptions"].get("enableCache"), f"{name} must not be cached"


def test_train_requests_a_configurable_gpu_and_download_retries(compiled):
    executors = compiled["deploymentSpec"]["executors"]
    resources = executors["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "gpu_limit" in resources["accelerator"]["resourceCount"]
    assert compiled["root"]["inputDefinitions"]["parameters"]["gpu_limit"]["defaultValue"] == 1
    retry = compiled["root"]["dag"]["tasks"]["download"]["retryPolicy"]
    assert retry["maxRetryCount"] == 3
    for name in TASKS:
        assert "accelerator" not in executors[f"exec-{name}"]["container"].get("resources", {}) or (
            name == "train"
        )


def test_steps_run_the_project_image_without_installing_kfp(compiled):
    for executor in compiled["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == "ghcr.io/fineserve/fineserve:0.1.0"
        assert "pip install" not in " ".join(container["command"])


def test_cluster_defaults(compiled):
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert params["base_model"]["defaultValue"] == "distilbert-base-uncased"
    assert params["dataset"]["defaultValue"] == "cardiffnlp/tweet_eval"
    assert params["dataset_config"]["defaultValue"] == "sentiment"


@pytest.mark.parametrize(
    "component",
    [
        download.download,
        tokenization.tokenize,
        training.train,
        evaluation.evaluate,
        registration.register,
        gate.gate,
        deploy.deploy,
        canary_analysis.analyze_canary,
    ],
)
def test_every_component_argument_is_documented(component):
    spec = component.component_spec
    documented = {**spec.inputs, **(spec.outputs or {})}
    missing = [name for name, io in documented.items() if not io.description and name != "Output"]
    assert not missing, f"{spec.name}: undocumented arguments {missing}"


def test_every_pipeline_parameter_is_documented(compiled):
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert [name for name, p in params.items() if not p.get("description")] == []


def test_parameters_are_typed_from_the_pipeline():
    values = validate(
        {"epochs": "2", "learning_rate": "3e-5", "drop_invalid_rows": "yes", "dataset": "x.csv"},
        {n: (t, d) for n, (t, d) in _types().items()},
    )
    assert values == {
        "epochs": 2.0,
        "learning_rate": 3e-5,
        "drop_invalid_rows": True,
        "dataset": "x.csv",
    }


def _types():
    from fineserve.pipelines.parameters import parameter_types

    return parameter_types(training_pipeline)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epoch": "2"}, r"unknown parameter 'epoch'; did you mean 'epochs'\?"),
        ({"max_length": "long"}, r"parameter 'max_length' expects an integer, got 'long'"),
        ({"epochs": "two"}, r"parameter 'epochs' expects a number, got 'two'"),
        ({"drop_invalid_rows": "maybe"}, r"'drop_invalid_rows' expects a boolean"),
        ({"max_length": 1.5}, r"'max_length' expects an integer, got 1.5"),
        ({"model_name": ["a"]}, r"'model_name' expects a string"),
    ],
)
def test_bad_parameters_are_refused_by_name(values, message):
    with pytest.raises(ParameterError, match=message):
        validate(values, _types())


def test_assignments_and_params_file(tmp_path):
    assert parse_assignments(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ParameterError, match="expected name=value, got 'epochs'"):
        parse_assignments(["epochs"])
    (tmp_path / "p.yaml").write_text("epochs: 2\nmodel_name: demo\n")
    assert load_params_file(tmp_path / "p.yaml") == {"epochs": 2, "model_name": "demo"}
    (tmp_path / "list.yaml").write_text("- epochs\n")
    with pytest.raises(ParameterError, match="must hold a mapping"):
        load_params_file(tmp_path / "list.yaml")
    with pytest.raises(ParameterError, match="cannot read parameter file"):
        load_params_file(tmp_path / "missing.yaml")


def test_local_defaults_are_offline_and_yield_to_user_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from fineserve.core.defaults import offline_base_model, offline_corpus_path

    default = local_run_arguments(training_pipeline, {}, root=tmp_path)
    assert default["dataset"] == offline_corpus_path()
    assert default["base_model"] == offline_base_model()
    assert default["label_column"] == "sentiment" and default["encoding"] == "latin-1"
    assert default["tracking_uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default["gpu_limit"] == 0
    own = local_run_arguments(training_pipeline, {"dataset": "mine.csv"}, root=tmp_path)
    assert own["label_column"] == "label" and own["encoding"] == "utf-8"


def _step_parameter_cases():
    from fineserve.pipelines.training_pipeline import STEPS

    return [(step, p) for step in STEPS for p in step.parameters()]


@pytest.mark.parametrize(
    ("step", "parameter"), _step_parameter_cases(), ids=lambda x: getattr(x, "name", "")
)
def test_each_step_parameter_is_a_pipeline_parameter_with_its_type_default_and_doc(step, parameter):
    from fineserve.pipelines.training_pipeline import CLUSTER_DEFAULTS

    exposed = training_pipeline.component_spec.inputs[parameter.name]
    own = step.component.component_spec.inputs[parameter.step_name]
    assert exposed.type == own.type
    assert exposed.default == CLUSTER_DEFAULTS.get(parameter.name, own.default)
    assert own.description and " ".join(own.description.split()) in exposed.description


def test_pipeline_parameters_are_the_steps_and_nothing_else():
    from fineserve.pipelines.training_pipeline import STEPS

    from_steps = {p.name for step in STEPS for p in step.parameters()}
    own = {"gpu_limit", "canary_analysis"}
    assert set(training_pipeline.component_spec.inputs) == from_steps | own


def test_steps_that_share_a_parameter_must_agree_on_it():
    from kfp import dsl

    from fineserve.pipelines.step_parameters import Step, pipeline_parameters

    @dsl.component
    def one(seed: int = 1):
        """One.

        Args:
            seed: A seed.
        """

    @dsl.component
    def two(seed: int = 2):
        """Two.

        Args:
            seed: Another seed.
        """

    def no_extra() -> None:
        """Nothing."""

    with pytest.raises(
        TypeError,
        match=r"'seed': steps disagree on its type or default \(int = 1 vs int = 2 in 'two'\)",
    ):
        pipeline_parameters([Step(one), Step(two)], defaults={}, extra=no_extra)
    parameters, docs = pipeline_parameters(
        [Step(one), Step(two)], defaults={"seed": 7}, extra=no_extra
    )
    assert [(p.name, p.default) for p in parameters] == [("seed", 7)]
    assert docs["seed"] == "one: A seed. two: Another seed."
    with pytest.raises(TypeError, match=r"step 'one' has no parameters \['sed'\]"):
        Step(one, hidden=("sed",)).parameters()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": "nan"}, r"'learning_rate' must be a finite number, got nan"),
        ({"epochs": "inf"}, r"'epochs' must be a finite number, got inf"),
        ({"epochs": "-1"}, r"'epochs' must be 0 \(the recipe's choice\) or more, got -1.0"),
        ({"class_weighting": "inverse"}, r"'class_weighting' must be balanced or none"),
        ({"max_length": "4"}, r"'max_length' must be from 8 to 8192 tokens, got 4"),
        ({"test_fraction": "1.5"}, r"'test_fraction' must be between 0 and 1 \(exclusive\)"),
        ({"batch_size": "0"}, r"'batch_size' must be at least 1, got 0"),
        ({"max_steps": "0"}, r"'max_steps' must be -1 \(no limit\) or at least 1, got 0"),
        ({"seed": "-1"}, r"'seed' must be from 0 to 2\*\*32 - 1, got -1"),
    ],
)
def test_out_of_range_parameters_are_refused_before_anything_runs(values, message):
    with pytest.raises(ParameterError, match=message):
        validate(values, _types())


def test_cli_refuses_nan_naming_the_parameter(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fineserve", "run", "--local", "-p", "learning_rate=nan"]
        + ["--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'learning_rate' must be a finite number, got nan" in result.stderr
    assert not (tmp_path / "local_outputs").exists()  # refused before anything ran


def test_local_runs_honour_mlflow_tracking_uri_unless_a_parameter_names_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    arguments = local_run_arguments(training_pipeline, {}, root=tmp_path)
    assert arguments["tracking_uri"] == "http://127.0.0.1:5999"
    assert arguments["artifact_location"] == ""  # the server's own artifact root
    own = local_run_arguments(training_pipeline, {"tracking_uri": "sqlite:///x.db"}, root=tmp_path)
    assert own["tracking_uri"] == "sqlite:///x.db"


def test_params_shows_the_cluster_and_the_local_default(capsys):
    from fineserve.cli import main

    main(["params"])
    lines = capsys.readouterr().out.splitlines()
    assert "cluster default" in lines[0] and "run --local default" in lines[0]
    rows = {line.split()[0]: line.split()[2:] for line in lines[1:]}
    assert rows["epochs"] == ["0.0", "1.0"]  # the recipe decides; the shipped corpus: 1 epoch
    assert rows["batch_size"] == ["32", "(same)"]
    assert rows["base_model"][0] == "'distilbert-base-uncased'"


# ------------------------------------------------------------------------------ params files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"epochs: 2\n1: 3\n", r"line 2: key '1' is not a name \(YAML reads it as int\)"),
        (b"epochs: 2\nnull: x\n", r"line 2: key 'null' is not a name \(YAML reads it as null\)"),
        (b"epochs: 2\nepochs: 3\n", r"line 2: key 'epochs' is given twice \(first on line 1\)"),
        (b"epochs: [1, 2]\n", r"line 1: 'epochs' holds a list; a parameter's value is one"),
        (b"model_name:\n  a: 1\n", r"line 2: 'model_name' holds a mapping"),
        (b"kubeflow:\n  timeouts:\n    7: 60\n", r"line 3: key '7' is not a name"),
        (b"epochs: 2\nmodel_name: caf\xe9\n", r"is not UTF-8 text \(byte 0xe9 on line 2\)"),
        (b"a: " + b"[" * 5000 + b"]" * 5000, r"line 1: nested more than 8 levels deep"),
        (
            b"".join(b" " * i + b"k%d:\n" % i for i in range(5000)) + b" " * 5000 + b"v: 1\n",
            r"line 9: nested more than 8 levels deep",
        ),
        (b"- epochs\n", r"must hold a mapping of name: value, not a list"),
        (b"epochs: [\n", r"is not valid YAML"),
    ],
    ids=[
        "integer-key", "null-key", "twice", "list-value", "mapping-value", "nested-int-key",
        "not-utf8", "nested-flow", "nested-block", "a-list", "broken",
    ],
)  # fmt: skip
def test_a_params_file_that_is_not_a_flat_mapping_of_names_is_refused_naming_line_and_key(
    tmp_path, content, message
):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    with pytest.raises(ParameterError, match=rf"^parameter file '{path}'(, | ).*{message}"):
        load_params_file(path)


def test_a_params_file_is_checked_by_every_command_before_anything_runs(tmp_path, capsys):
    from fineserve.cli import main

    (tmp_path / "p.yaml").write_bytes(b"epochs: 2\n1: 3\n")
    for argv in (
        ["run", "--local", "--output-dir", str(tmp_path)],
        ["compile", "-o", str(tmp_path / "t.yaml")],
        ["submit"],
        ["schedule", "create", "nightly", "--cron", "0 3 * * *"],
    ):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--params", str(tmp_path / "p.yaml")])
        assert exited.value.code == 2, argv
        err = capsys.readouterr().err
        assert f"parameter file '{tmp_path / 'p.yaml'}', line 2: key '1' is not a name" in err, argv
        assert "Traceback" not in err
    assert not (tmp_path / "local_outputs").exists() and not (tmp_path / "t.yaml").exists()


def test_yaml_anchors_and_a_kubeflow_section_still_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "model_name: &name demo\nexperiment_name: *name\n"
        "kubeflow:\n  secrets:\n    - {name: s3, keys: {AWS_KEY: AWS_KEY}}\n"
    )
    assert load_params_file(path) == {
        "model_name": "demo",
        "experiment_name": "demo",
        "kubeflow": {"secrets": [{"name": "s3", "keys": {"AWS_KEY": "AWS_KEY"}}]},
    }


# ------------------------------------------------------------------------------ cluster names


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"model_name": "m" * 10_000_000},
            r"'model_name' is 10000000 characters long, at most 256",
        ),
        ({"model_name": "team/model"}, r"'model_name' must not contain '/'"),
        ({"model_name": "it's"}, r"'model_name' must not contain \"'\""),
        ({"model_name": ".."}, r"'model_name' must stay the same name when read as a path"),
        ({"model_name": " "}, r"'model_name' must not be empty"),
        ({"model_name": "./x"}, r"'model_name' must not contain '/'"),
        ({"experiment_name": ""}, r"'experiment_name' must not be empty"),
        ({"inference_service": "Bad_Name!"}, r"'inference_service' must be a DNS-1035 label"),
        ({"inference_service": "9lives"}, r"'inference_service' must be a DNS-1035 label"),
        (
            {"inference_service": "a" * 54},
            r"is 54 characters long: in Serverless mode at most 53, as KServe names the "
            r"predictor's Service NAME-predictor",
        ),
        (
            {"inference_service": "a" * 37, "deployment_mode": "Standard"},
            r"in Standard mode at most 36, as KServe names the predictor's Service "
            r"NAME-predictor-vVERSION-predictor",
        ),
        ({"namespace": "NOT A NS"}, r"'namespace' must be a DNS-1123 label"),
        ({"namespace": "team.ml"}, r"'namespace' must be a DNS-1123 label"),
        ({"namespace": "n" * 64}, r"'namespace' is 64 characters long, at most 63"),
        ({"storage_service_account": "Storage"}, r"'storage_service_account' must be a Kub"),
        ({"predictor_memory": "lots"}, r"'predictor_memory' must be a Kubernetes quantity"),
        ({"predictor_memory_limit": "4 Gi"}, r"'predictor_memory_limit' must be a Kubernetes"),
        ({"predictor_cpu": "inf"}, r"'predictor_cpu' must be a Kubernetes quantity"),
        ({"predictor_cpu_limit": "0"}, r"'predictor_cpu_limit' must be a quantity above 0"),
        ({"predictor_cpu": "3"}, r"cpu request 3 is above its limit 2"),
        ({"min_replicas": "0", "deployment_mode": "Standard"}, r"Standard mode cannot scale to"),
        ({"text_column": "label"}, r"text_column and label_column are both 'label'"),
        ({"min_class_rows": "0"}, r"'min_class_rows' must be at least 1"),
        ({"rare_classes": "merge"}, r"'rare_classes' must be keep, drop or fail, got 'merge'"),
    ],
)
def test_names_and_quantities_the_cluster_would_refuse_are_refused_first(values, message):
    with pytest.raises(ParameterError, match=message) as err:
        validate(values, _types())
    assert len(str(err.value)) < 400  # the value is shown shortened


def test_every_default_passes_the_checks_on_the_cluster_and_locally(tmp_path):
    types = _types()
    assert validate({}, types) == {}
    validate({name: default for name, (_, default) in types.items()}, types)
    local_run_arguments(training_pipeline, {}, root=tmp_path)
    names = {"inference_service": "a" * 53, "namespace": "team-ml", "model_name": "Ünïcode model"}
    assert validate({**names, "predictor_memory": "1.5Gi", "predictor_cpu": "500m"}, types)


def test_text_and_label_columns_are_compared_once_the_local_defaults_apply(tmp_path):
    # the shipped corpus labels its rows in `sentiment`: a text column named `label` is fine
    assert local_run_arguments(training_pipeline, {"text_column": "label"}, root=tmp_path)
    with pytest.raises(ParameterError, match="text_column and label_column are both 'sentiment'"):
        local_run_arguments(training_pipeline, {"text_column": "sentiment"}, root=tmp_path)


def test_model_names_mlflow_refuses_are_refused_here_too():
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name

    from fineserve.pipelines.cluster_names import registered_model_name_problem

    for name in ("ok", "a/b", "a:b", "50%", "..", ".", "a/./b", " ", "x/", "../x", "a\\b"):
        try:
            _validate_model_name(name)
        except MlflowException:
            assert registered_model_name_problem(name), name


@pytest.mark.parametrize(
    "argv",
    [
        ["-p", "inference_service=Bad_Name!", "-p", "kube_context=prod"],
        ["-p", "text_column=text", "-p", "label_column=text"],
        ["-p", "predictor_memory=lots"],
    ],
)
def test_a_local_run_refuses_them_before_anything_runs(tmp_path, capsys, argv):
    from fineserve.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "--local", "--output-dir", str(tmp_path), "-p", "dataset=x.csv", *argv])
    assert exited.value.code == 2
    assert "fineserve run: " in capsys.readouterr().err
    assert not (tmp_path / "local_outputs").exists()
