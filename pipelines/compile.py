"""Compile the training pipeline for Kubeflow: one image everywhere, named and versioned.

Every step's container runs ``image`` (and deploy rolls it out as the predictor), the cluster
plumbing of a params file's `kubeflow:` section goes into the platform spec, and the pipeline's
display name and description say which fineserve version and image it is, as the Kubeflow UI
shows them after an upload.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from fineserve.core.defaults import component_image
from fineserve.pipelines.kubeflow_config import KubeflowConfig
from fineserve.pipelines.training_pipeline import DESCRIPTION, build_training_pipeline


def fineserve_version() -> str:
    """The installed fineserve version ("unknown" when run from a source tree)."""
    try:
        return metadata.version("fineserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def compile_pipeline(
    output: str | Path, *, image: str = "", kubeflow: KubeflowConfig | None = None
) -> dict:
    """Write the pipeline IR YAML to ``output``; its PipelineSpec as a dict.

    The image is ``image``, else the `kubeflow:` section's, else `component_image()`
    ($FINESERVE_IMAGE, else ours).
    """
    from kfp import compiler

    image = image or (kubeflow.image if kubeflow else "") or component_image()
    pipeline = build_training_pipeline(kubeflow=kubeflow, image=image)
    with tempfile.TemporaryDirectory() as scratch:
        compiled = Path(scratch) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(compiled))
        documents = list(yaml.safe_load_all(compiled.read_text()))
    spec = documents[0]
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    version = fineserve_version()
    spec["pipelineInfo"]["displayName"] = f"fineserve training {version}"
    spec["pipelineInfo"]["description"] = f"{DESCRIPTION} (fineserve {version}, image {image})"
    Path(output).write_text(yaml.safe_dump_all(documents, sort_keys=True))
    return spec
