"""Run the training DAG on this machine with `kfp.local.SubprocessRunner`.

Each step runs as a subprocess of the current Python environment (which must have fineserve
installed), streams its logs, and writes its artifacts under ``output_dir/<run name>/<task>/``.
"""

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fineserve.components.canary_analysis import analyze_canary
from fineserve.components.deploy import deploy
from fineserve.core.artifacts import (
    CHALLENGER,
    read_evaluation_results,
    read_model_info,
    summary_metrics,
)
from fineserve.core.defaults import component_image
from fineserve.pipelines.run_console import RunConsole
from fineserve.pipelines.training_pipeline import (
    ANALYZE,
    DEPLOY,
    PIPELINE_NAME,
    build_training_pipeline,
)


@dataclass
class LocalRun:
    """Where a finished local run left its results."""

    run_dir: Path
    outputs: dict[str, Any]
    metrics: dict[str, float]
    train_info: dict[str, Any]
    seconds: float
    warnings: list[str]  # why the test scores may mean little (evaluate's results)
    baseline_f1: list[float] = field(default_factory=list)  # TF-IDF's per class, if any
    reports: dict[str, Path] = field(default_factory=dict)  # deploy, analyze-canary: if run

    def summary(self, arguments: dict[str, Any]) -> str:
        """What the user reads at the end of `fineserve run --local`."""
        m, train = self.metrics, self.train_info["train_metrics"]
        name, version = arguments["model_name"], self.outputs["model_version"]
        lines = [
            f"fineserve run finished in {self.seconds / 60:.1f} min",
            f"  test  accuracy {m['accuracy']:.4f} [{m['accuracy_ci_low']:.4f}, "
            f"{m['accuracy_ci_high']:.4f}]  macro-F1 {m['macro_f1']:.4f} "
            f"[{m['macro_f1_ci_low']:.4f}, {m['macro_f1_ci_high']:.4f}] (95% bootstrap CI)",
        ]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        if "baseline_macro_f1" in m:
            lines.append(
                f"  TF-IDF + logistic regression baseline: accuracy {m['baseline_accuracy']:.4f}"
                f"  macro-F1 {m['baseline_macro_f1']:.4f}"
            )
        lines.append("  per-class F1 (TF-IDF): " + self.per_class_f1())
        precisions = [key.removesuffix("_agreement") for key in m if key.endswith("_agreement")]
        if precisions:
            lines.append(
                "  served in reduced precision (same test split): "
                + "; ".join(
                    f"{name} macro-F1 {m[f'{name}_macro_f1']:.4f}, "
                    f"{m[f'{name}_agreement']:.1%} same class as float32"
                    for name in precisions
                )
            )
        recipe = self.train_info.get("recipe") or {}
        if recipe.get("recipe_chose_epochs"):
            lines.append(
                f"  recipe: {recipe['why']}, learning rate {recipe['learning_rate']:g}, "
                f"class weighting {recipe['class_weighting']}"
            )
        lines += [
            f"  train {train['train_rows']} rows, {train['epochs_completed']} epochs, "
            f"{train['train_samples_per_second']:.1f} samples/s on "
            f"{self.train_info['device']} ({self.train_info['precision']})",
            f"  MLflow run {self.outputs['mlflow_run_id']} in experiment "
            f"{arguments['experiment_name']!r} at {arguments['tracking_uri']}",
            f"  model version {name} v{version} (alias @{CHALLENGER})",
            f"  gate: {'passed' if self.outputs['gate_passed'] else 'failed'}: "
            f"{self.outputs['gate_reason']}",
            f"  deploy: {self.deploy_line(arguments)}",
            *(
                [f"  canary analysis: {self.verdict('analyze-canary')}"]
                if "analyze-canary" in self.reports
                else []
            ),
            f"  artifacts: {self.run_dir}",
            f"    model {self.run_dir / 'train' / 'model'}",
            f"    report {self.run_dir / 'evaluate' / 'report'}",
            f"  serve it: fineserve serve --model-uri models:/{name}@{CHALLENGER}",
        ]
        return "\n".join(lines)

    def per_class_f1(self) -> str:
        """Each class's test F1, with the baseline's in brackets when there is one."""
        names = self.train_info["labels"]
        return ", ".join(
            f"{name} {self.metrics[f'f1_{name}']:.2f}"
            + (f" ({self.baseline_f1[i]:.2f})" if self.baseline_f1 else "")
            if f"f1_{name}" in self.metrics
            else f"{name} -"  # not in the test split: a warning above names it
            for i, name in enumerate(names)
        )

    def deploy_line(self, arguments: dict[str, Any]) -> str:
        """What the deploy step did (its report's verdict), or why it did not run."""
        if not self.outputs["gate_passed"]:
            return "not run: the gate failed"
        if "deploy" not in self.reports:
            return "skipped: no cluster named (-p kube_context=NAME deploys from a local run)"
        return self.verdict("deploy")

    def verdict(self, step: str) -> str:
        """The verdict line of a step's Markdown report, as plain text."""
        lines = self.reports[step].read_text().splitlines()
        verdict = next((line for line in lines if line.startswith("InferenceService")), "")
        return verdict.replace("**", "").replace("`", "")


@contextlib.contextmanager
def _steps_run_this_interpreter():
    """Run steps with `python3` from PATH, that being this interpreter.

    kfp.local (2.17) points steps at this interpreter by replacing every "python3" in a step's
    command line with `sys.executable`, parameter values included: a path such as
    `.venv/lib/python3.11/site-packages/...` comes out mangled. Setting `sys.executable` to
    "python3" makes that replacement a no-op; this interpreter's own `python3` goes first on PATH.
    """
    python3 = Path(sys.executable).with_name("python3")
    if not python3.exists() or python3.resolve() != Path(sys.executable).resolve():
        yield  # no sibling python3 to rely on: keep kfp's behaviour
        return
    saved_executable, saved_path = sys.executable, os.environ.get("PATH", "")
    sys.executable = "python3"
    os.environ["PATH"] = f"{python3.parent}{os.pathsep}{saved_path}"
    try:
        yield
    finally:
        sys.executable = saved_executable
        os.environ["PATH"] = saved_path


def run_local(
    arguments: dict[str, Any],
    output_dir: str | Path,
    *,
    log_path: str | Path | None = None,
    verbose: bool = True,
) -> LocalRun:
    """Run the DAG with ``arguments`` (already validated); raise if a step fails.

    With a ``log_path``, everything the steps print goes there, and the console shows a line
    per step, the training progress and a failed step's last lines (`RunConsole`); with
    ``verbose`` too, the console gets everything as well.
    """
    from kfp import local

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(output_dir),
        raise_on_error=True,
    )
    before = set(output_dir.glob(f"{PIPELINE_NAME}-*"))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            log = stack.enter_context(open(log_path, "a", encoding="utf-8"))  # noqa: SIM115
            log.write("parameters:\n" + "".join(f"  {k} = {v!r}\n" for k, v in arguments.items()))
            stack.enter_context(contextlib.redirect_stderr(log))
            stack.enter_context(contextlib.redirect_stdout(RunConsole(log, sys.stdout, verbose)))
        stack.enter_context(_steps_run_this_interpreter())
        task = build_training_pipeline(download_retries=0)(**arguments)
        (run_dir,) = set(output_dir.glob(f"{PIPELINE_NAME}-*")) - before
        reports = _run_gated_steps(dict(task.outputs), arguments, run_dir)
    seconds = time.monotonic() - started
    results = read_evaluation_results(run_dir / "evaluate" / "results")
    train_info = read_model_info(run_dir / "train" / "model")
    return LocalRun(
        run_dir=run_dir,
        outputs=dict(task.outputs),
        metrics=summary_metrics(results),
        train_info=train_info,
        seconds=seconds,
        warnings=results.get("warnings", []),
        baseline_f1=list((results.get("baseline") or {}).get("f1", [])),
        reports=reports,
    )


def _run_gated_steps(
    outputs: dict[str, Any], arguments: dict[str, Any], run_dir: Path
) -> dict[str, Path]:
    """Run deploy and the canary analysis as the DAG's `dsl.If`s do on Kubeflow; their reports.

    kfp.local (2.17.0-2.17.3) cannot evaluate a condition on a task's output: it looks the
    channel (`gate-passed`) up among the pipeline's inputs, finds nothing and reads the
    condition as false, so inside the DAG these steps never run locally. Here the same
    components run with the same arguments, after the gate, on the same conditions: the gate
    passed and a cluster is named; for the analysis, `canary_analysis` and a started canary.
    """
    in_dag = {s: run_dir / s / "report" for s in ("deploy", "analyze-canary")}
    if in_dag["deploy"].exists():  # a kfp.local that evaluates conditions ran them in the DAG
        return {step: report for step, report in in_dag.items() if report.exists()}
    if not outputs["gate_passed"] or not arguments.get("kube_context"):
        return {}
    deployed = deploy(
        model_version=outputs["model_version"],
        image=component_image(),
        **DEPLOY.arguments(arguments),
    )
    reports = {"deploy": Path(deployed.outputs["report"].path)}
    if arguments["canary_analysis"] and deployed.outputs["action"] == "canary":
        analyzed = analyze_canary(**ANALYZE.arguments(arguments))
        reports["analyze-canary"] = Path(analyzed.outputs["report"].path)
    return reports
