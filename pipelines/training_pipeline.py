"""The DAG: download → tokenize → train → evaluate → register → gate → deploy → analyze canary.

Deploy runs only when the gate passes (`dsl.If`), and the canary analysis only when it is on
(`canary_analysis`) and deploy started a canary; both as the run's ServiceAccount (submit runs with
`fineserve-pipeline` from manifests/: kfp-kubernetes 2.17 has no per-task ServiceAccount).

Every step parameter is a pipeline parameter (see `fineserve.pipelines.step_parameters`): a
knob added to a component appears here, in `fineserve params` and in the Kubeflow UI with no
further edit. The defaults are the cluster defaults (a Hub checkpoint and a Hub dataset);
`fineserve.pipelines.parameters.LOCAL_RUN_DEFAULTS` swaps in the offline ones for local runs.
"""

from typing import Any, NamedTuple

from kfp import dsl

from fineserve.components.canary_analysis import analyze_canary
from fineserve.components.deploy import deploy
from fineserve.components.download import download
from fineserve.components.evaluation import evaluate
from fineserve.components.gate import gate
from fineserve.components.registration import register
from fineserve.components.tokenization import tokenize
from fineserve.components.training import train
from fineserve.core.defaults import (
    CLUSTER_BASE_MODEL,
    CLUSTER_DATASET,
    CLUSTER_DATASET_CONFIG,
    CLUSTER_TRACKING_URI,
    component_image,
)
from fineserve.pipelines.kubeflow_config import CACHE_MOUNT, KubeflowConfig
from fineserve.pipelines.kubeflow_config import apply as apply_kubeflow_config
from fineserve.pipelines.step_parameters import Step, pipeline_function, pipeline_parameters

PIPELINE_NAME = "fineserve-training"
DESCRIPTION = (
    "Fine-tune a Hugging Face text classifier, evaluate it against a TF-IDF baseline, register "
    "it in MLflow with the alias `challenger`, gate it against the `champion`, and roll it out "
    "as a KServe canary when it passes."
)
DOWNLOAD_RETRIES = 3


class TrainingOutputs(NamedTuple):
    """What a run yields: test scores and the registered version with its storage URI."""

    accuracy: float
    macro_f1: float
    model_version: str
    storage_uri: str
    mlflow_run_id: str
    gate_passed: bool
    gate_reason: str


OUTPUT_DOCS = {
    "accuracy": "Test accuracy of the fine-tuned model.",
    "macro_f1": "Test macro-F1 of the fine-tuned model.",
    "model_version": "The MLflow model version registered (alias `challenger`).",
    "storage_uri": "Where that version's HF directory is stored (a KServe `storageUri`).",
    "mlflow_run_id": "The MLflow run holding parameters, metrics and the report.",
    "gate_passed": "Whether the gate lets the new version replace the champion.",
    "gate_reason": "Why the gate decided so, in a sentence.",
}

DOWNLOAD = Step(
    download,
    renamed={"source": "dataset", "config": "dataset_config", "revision": "dataset_revision"},
)
TOKENIZE = Step(tokenize)
TRAIN = Step(train)
EVALUATE = Step(evaluate, hidden=("batch_size",))
REGISTER = Step(register, hidden=("alias", "image", "pipeline_run_id"))
GATE = Step(gate, hidden=("challenger_version",))
DEPLOY = Step(deploy, hidden=("model_version", "image"))
ANALYZE = Step(analyze_canary)
STEPS = [DOWNLOAD, TOKENIZE, TRAIN, EVALUATE, REGISTER, GATE, DEPLOY, ANALYZE]

#: Where the pipeline's default differs from the step's: the cluster run's data, model, MLflow.
CLUSTER_DEFAULTS: dict[str, Any] = {
    "dataset": CLUSTER_DATASET,
    "dataset_config": CLUSTER_DATASET_CONFIG,
    "base_model": CLUSTER_BASE_MODEL,
    "model_name": "fineserve-classifier",
    "tracking_uri": CLUSTER_TRACKING_URI,
}


def pipeline_settings(gpu_limit: int = 1, canary_analysis: bool = False) -> None:
    """Parameters of the pipeline itself, not of one step's function.

    Args:
        gpu_limit: GPUs requested by the train step.
        canary_analysis: After deploy starts a canary, step its traffic up on Prometheus'
            verdict and promote or roll it back (analyze_canary); off: an operator decides.
    """


def build_training_pipeline(
    download_retries: int = DOWNLOAD_RETRIES,
    kubeflow: KubeflowConfig | None = None,
    image: str = "",
):
    """The DAG, with ``download_retries`` retries (backoff 30 s, doubling) on the download step.

    Local runs use 0: there a failed download is nearly always bad input, reported at once.
    ``kubeflow`` sets the steps' pods up for a cluster (secrets, cache volume, GPU nodes,
    timeouts; see `kubeflow_config`); ``image`` is the predictor image deploy and register
    record (default: `component_image()`).
    """
    image = image or component_image()
    defaults = dict(CLUSTER_DEFAULTS)
    if kubeflow is not None and kubeflow.cache_pvc:  # checkpoints on the volume: retries resume
        defaults["checkpoint_dir"] = f"{CACHE_MOUNT}/checkpoints"
    parameters, descriptions = pipeline_parameters(
        STEPS, defaults=defaults, extra=pipeline_settings
    )

    def dag(values: dict[str, Any]) -> TrainingOutputs:
        data = download(**DOWNLOAD.arguments(values))
        data.set_display_name("download")
        if download_retries:
            data.set_retry(num_retries=download_retries, backoff_duration="30s")

        tokens = tokenize(dataset=data.outputs["dataset"], **TOKENIZE.arguments(values))
        tokens.set_display_name("tokenize")

        trained = train(tokenized=tokens.outputs["tokenized"], **TRAIN.arguments(values))
        trained.set_display_name("train")
        trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(values["gpu_limit"])
        trained.set_cpu_request("2").set_memory_request("8G")

        scored = evaluate(
            dataset=data.outputs["dataset"],
            model=trained.outputs["model"],
            **EVALUATE.arguments(values),
        )
        scored.set_display_name("evaluate")

        registered = register(
            model=trained.outputs["model"],
            results=scored.outputs["results"],
            report=scored.outputs["report"],
            image=image,
            **REGISTER.arguments(values),
        )
        registered.set_display_name("register")

        gated = gate(
            dataset=data.outputs["dataset"],
            results=scored.outputs["results"],
            challenger_version=registered.outputs["model_version"],
            **GATE.arguments(values),
        )
        gated.set_display_name("gate")
        gated.set_caching_options(False)  # the champion may have changed since a cached run

        with dsl.If(gated.outputs["passed"] == True, name="gate-passed"):  # noqa: E712
            deployed = deploy(
                model_version=registered.outputs["model_version"],
                image=image,
                **DEPLOY.arguments(values),
            )
            deployed.set_display_name("deploy")
            deployed.set_caching_options(False)  # the cluster is state: always look again
            with (
                dsl.If(
                    values["canary_analysis"] == True,  # noqa: E712
                    name="canary-analysis-on",
                ),
                dsl.If(deployed.outputs["action"] == "canary", name="canary-started"),
            ):
                analyzed = analyze_canary(**ANALYZE.arguments(values))
                analyzed.set_display_name("analyze canary")
                analyzed.set_caching_options(False)

        if kubeflow is not None:
            tasks = {
                "download": data, "tokenize": tokens, "train": trained, "evaluate": scored,
                "register": registered, "gate": gated, "deploy": deployed,
                "analyze-canary": analyzed,
            }  # fmt: skip
            apply_kubeflow_config(tasks, kubeflow)
        return TrainingOutputs(
            accuracy=scored.outputs["accuracy"],
            macro_f1=scored.outputs["macro_f1"],
            model_version=registered.outputs["model_version"],
            storage_uri=registered.outputs["storage_uri"],
            mlflow_run_id=registered.outputs["run_id"],
            gate_passed=gated.outputs["passed"],
            gate_reason=gated.outputs["reason"],
        )

    func = pipeline_function(
        "training_pipeline",
        dag,
        parameters,
        descriptions,
        summary="Fine-tune, evaluate and register a text classifier.",
        returns=TrainingOutputs,
        returns_doc=OUTPUT_DOCS,
    )
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(func)


training_pipeline = build_training_pipeline()
