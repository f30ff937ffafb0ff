"""`fineserve`: compile, run and serve; a thin layer over `fineserve.pipelines` and `.serving`."""

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from fineserve.core.cluster import READ_TIMEOUT
from fineserve.core.errors import ClusterError, DataError, ParameterError, RegistryError, shown


def _compile(args: argparse.Namespace) -> None:
    from fineserve.pipelines.compile import compile_pipeline
    from fineserve.pipelines.parameters import parameter_types, validate
    from fineserve.pipelines.training_pipeline import training_pipeline

    values, kubeflow = _params_file(args.params)
    validate(values, parameter_types(training_pipeline))  # the file is also submit's: check it
    spec = compile_pipeline(args.output, image=args.image, kubeflow=kubeflow)
    image = next(iter(spec["deploymentSpec"]["executors"].values()))["container"]["image"]
    print(
        f"wrote {args.output} ({spec['pipelineInfo']['displayName']}, image {image}): upload "
        "it in the Kubeflow UI (Pipelines > Upload pipeline), or `fineserve submit`"
    )


def _params_file(path: str | None):
    """A params file's pipeline parameters and its `kubeflow:` section."""
    from fineserve.pipelines.kubeflow_config import KubeflowConfig, split_params
    from fineserve.pipelines.parameters import load_params_file

    if not path:
        return {}, KubeflowConfig()
    return split_params(load_params_file(path))


def _user_values(args: argparse.Namespace) -> dict:
    from fineserve.pipelines.parameters import parse_assignments

    values, _ = _params_file(args.params)  # the kubeflow: section is for the cluster commands
    values.update(parse_assignments(args.param))
    return values


def _kubeflow_target(args: argparse.Namespace):
    """The checked run parameters, the kubeflow settings with the flags applied, a connection."""
    from fineserve.pipelines.parameters import parameter_types, parse_assignments, validate
    from fineserve.pipelines.training_pipeline import training_pipeline

    values, kubeflow = _params_file(args.params)
    values.update(parse_assignments(args.param))
    params = validate(values, parameter_types(training_pipeline))  # names a bad key
    kubeflow, connection = _connect(args, kubeflow)
    return params, kubeflow, connection


def _connect(args: argparse.Namespace, kubeflow):
    """The kubeflow settings with the command's flags applied, and a checked connection."""
    import dataclasses

    from fineserve.pipelines import cluster_names, kfp_api

    flags = ("host", "namespace", "experiment", "image")
    overrides = {name: getattr(args, name) for name in flags if getattr(args, name, "")}
    problem = cluster_names.dns1123_label_problem(args.namespace) if args.namespace else None
    if problem:  # as kubeflow.namespace is checked in the params file
        raise ParameterError(f"--namespace {problem}, got {shown(args.namespace)}")
    kubeflow = dataclasses.replace(kubeflow, **overrides)
    token = kfp_api.read_token(args.token_file)
    return kubeflow, kfp_api.connect(kubeflow.host, kubeflow.namespace, token)


def _compiled_package(kubeflow, workdir: str) -> str:
    from fineserve.pipelines.compile import compile_pipeline

    package = f"{workdir}/training.yaml"
    compile_pipeline(package, kubeflow=kubeflow)
    return package


def _submit(args: argparse.Namespace) -> None:
    import tempfile

    from fineserve.pipelines import kfp_api
    from fineserve.pipelines.training_pipeline import PIPELINE_NAME

    params, kubeflow, connection = _kubeflow_target(args)
    with tempfile.TemporaryDirectory() as workdir:
        done = kfp_api.submit(
            connection,
            _compiled_package(kubeflow, workdir),
            pipeline_name=args.pipeline_name or PIPELINE_NAME,
            experiment=kubeflow.experiment,
            run_name=args.run_name or f"fineserve-{time.strftime('%Y%m%d-%H%M%S')}",
            params=params,
            service_account=kubeflow.service_account,
            version_name=args.version_name,
        )
    print(
        f"pipeline version {done.pinned.version_name} ({done.pinned.version_id}) uploaded; "
        f"run {done.id} started in experiment {kubeflow.experiment!r}\n{done.url}"
    )


def _schedule(args: argparse.Namespace) -> None:
    from fineserve.pipelines import kfp_api

    if args.action == "create":
        _schedule_create(args)
        return
    _, connection = _connect(args, _params_file(args.params)[1])
    if args.action == "list":
        runs = kfp_api.recurring_runs(connection)
        if not runs:
            print("no recurring runs")
        for recurring in runs:
            trigger, upcoming = kfp_api.describe_trigger(recurring)
            print(
                f"{recurring.recurring_run_id}  {recurring.display_name}  {recurring.status}  "
                f"{trigger}  max concurrency {recurring.max_concurrency}  "
                f"{'no catch-up' if recurring.no_catchup else 'catch-up'}"
            )
            if upcoming and recurring.status == "ENABLED":
                print("  next: " + ", ".join(t.strftime("%Y-%m-%d %H:%M:%S UTC") for t in upcoming))
        return
    kfp_api.set_recurring_run(connection, args.id, args.action)
    print(f"recurring run {args.id}: {args.action}d")


def _schedule_create(args: argparse.Namespace) -> None:
    import tempfile

    from fineserve.pipelines import kfp_api
    from fineserve.pipelines.training_pipeline import PIPELINE_NAME

    cron = kfp_api.to_six_fields(args.cron) if args.cron else ""  # before any request
    every = kfp_api.parse_interval(args.every) if args.every else 0
    if bool(cron) == bool(every):
        raise ParameterError("schedule create needs exactly one of --cron and --every")
    params, kubeflow, connection = _kubeflow_target(args)
    with tempfile.TemporaryDirectory() as workdir:
        done = kfp_api.schedule(
            connection,
            _compiled_package(kubeflow, workdir),
            pipeline_name=args.pipeline_name or PIPELINE_NAME,
            experiment=kubeflow.experiment,
            name=args.name,
            params=params,
            cron=cron,
            interval_seconds=every,
            catchup=args.catchup,
            service_account=kubeflow.service_account,
            version_name=args.version_name,
        )
    if cron:
        when = f"cron {cron!r} (six fields, seconds first, as KFP reads it)"
        upcoming = ", ".join(t.strftime("%Y-%m-%d %H:%M:%S UTC") for t in kfp_api.next_runs(cron))
        when += f"; next runs: {upcoming}"
    else:
        when = f"every {every}s"
    print(
        f"recurring run {done.id} ({args.name!r}) on pipeline version "
        f"{done.pinned.version_name}: {when}; one run at a time, "
        f"{'catching up' if args.catchup else 'no catch-up'}\n{done.url}"
    )


def _run(args: argparse.Namespace) -> None:
    from fineserve.pipelines.local_run import run_local
    from fineserve.pipelines.parameters import local_run_arguments
    from fineserve.pipelines.training_pipeline import training_pipeline

    if not args.local:
        raise SystemExit(
            "fineserve run: only local runs (--local) are supported from this command; for "
            "Kubeflow, `fineserve compile -o training.yaml` and upload it in the UI"
        )
    arguments = local_run_arguments(training_pipeline, _user_values(args), root=args.output_dir)
    if not args.verbose:  # kfp.local's own INFO lines outside the steps (they go to the log)
        logging.getLogger().setLevel(logging.WARNING)
    outputs = Path(args.output_dir) / "local_outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    log_path = outputs / time.strftime("fineserve-run-%Y%m%d-%H%M%S.log")
    print(
        f"step logs and parameters: {log_path}"
        + ("" if args.verbose else " (--verbose shows them)")
    )
    try:
        run = run_local(arguments, outputs, log_path=log_path, verbose=args.verbose)
    except RuntimeError:
        print(f"the full output of every step is in {log_path}")
        raise
    print(run.summary(arguments))


def _params(args: argparse.Namespace) -> None:
    from fineserve.pipelines.parameters import local_run_arguments, parameter_types
    from fineserve.pipelines.training_pipeline import training_pipeline

    local = local_run_arguments(training_pipeline, {})
    print(f"{'parameter':<24} {'type':<6} {'cluster default (Kubeflow)':<40} run --local default")
    for name, (kind, default) in parameter_types(training_pipeline).items():
        here = "(same)" if local[name] == default else repr(local[name])
        print(f"{name:<24} {kind.__name__:<6} {default!r:<40} {here}")


def _serve(args: argparse.Namespace) -> None:
    from fineserve.serving.entrypoint import run_serve

    run_serve(args)


def _rollout(args: argparse.Namespace) -> None:
    import json

    from fineserve.core import registry, rollout
    from fineserve.core.cluster import Cluster

    cluster = Cluster(context=args.context, namespace=args.namespace, timeout=args.request_timeout)
    if args.action == "status":
        status = rollout.status(cluster, args.name, registry.mlflow_client(args.tracking_uri))
        print(
            json.dumps(status.as_dict(), indent=2)
            if args.output == "json"
            else rollout.render(status)
        )
        return
    if args.action == "set":
        changed = rollout.set_traffic(cluster, args.name, args.percent)
    elif args.action == "promote":
        changed = rollout.promote(cluster, args.name, registry.mlflow_client(args.tracking_uri))
    else:
        changed = rollout.rollback(cluster, args.name)
    print(rollout.render(rollout.Status(changed, {}, "")))


#: `rollout analyze` exit codes by result (rolled-back and the rest: the canary did not go out).
ANALYSIS_EXIT = {"promoted": 0, "rolled-back": 1, "inconclusive": 3, "interrupted": 130}


def _analyze(args: argparse.Namespace) -> None:
    import dataclasses
    import json
    import os

    from fineserve.core import canary_analysis as analysis
    from fineserve.core import registry
    from fineserve.core.cluster import Cluster

    url = args.prometheus_url or os.environ.get("PROMETHEUS_URL", "")
    if not url:
        raise ParameterError("rollout analyze needs --prometheus-url or $PROMETHEUS_URL")
    thresholds = analysis.Thresholds(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(analysis.Thresholds)}
    )
    settings = analysis.Settings(
        steps=analysis.parse_steps(args.steps),
        interval=args.interval,
        threshold=args.threshold,
        max_inconclusive=args.max_inconclusive,
        thresholds=thresholds,
        queries=analysis.parse_queries(args.query),
    )
    settings.check()  # before anything reaches the cluster
    outcome = analysis.analyze(
        Cluster(context=args.context, namespace=args.namespace, timeout=args.request_timeout),
        args.name,
        analysis.Prometheus(url, timeout=args.request_timeout),
        registry.mlflow_client(args.tracking_uri),
        settings,
        report=(lambda line: None) if args.output == "json" else print,
    )
    if args.output == "json":
        print(json.dumps(outcome.as_dict(), indent=2))
    else:
        print(analysis.render(outcome))
    if outcome.result != "promoted":
        raise SystemExit(ANALYSIS_EXIT[outcome.result])


def _add_analyze_arguments(sub: argparse.ArgumentParser) -> None:
    import dataclasses

    from fineserve.core import canary_analysis as analysis

    defaults = analysis.Settings()
    sub.add_argument("--prometheus-url", default="", help="default: $PROMETHEUS_URL")
    sub.add_argument(
        "--steps",
        default=",".join(map(str, defaults.steps)),
        help="canary traffic steps in %%, rising, ending at 100 (the promotion)",
    )
    sub.add_argument(
        "--interval", type=float, default=defaults.interval,
        help="seconds each step is held before it is checked (also the query window)",
    )  # fmt: skip
    sub.add_argument(
        "--threshold", type=int, default=defaults.threshold,
        help="failed checks (in all) before the canary is rolled back",
    )  # fmt: skip
    sub.add_argument(
        "--max-inconclusive", type=int, default=defaults.max_inconclusive,
        help="checks in a row with too little traffic before giving up (traffic stays)",
    )  # fmt: skip
    for f in dataclasses.fields(analysis.Thresholds):
        sub.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
            default=f.default, help=f"default {f.default}",
        )  # fmt: skip
    sub.add_argument(
        "--query", action="append", default=[], metavar="NAME=PROMQL",
        help=f"override a check's query ({', '.join(analysis.QUERIES)}); $model, $version, "
        "$window are filled in",
    )  # fmt: skip


def _add_kubeflow_arguments(sub: argparse.ArgumentParser, *, run: bool = True) -> None:
    sub.add_argument("--params", metavar="FILE.yaml", help="parameters and a kubeflow: section")
    sub.add_argument("--host", default="", help="KFP API URL (default: kubeflow.host)")
    sub.add_argument("-n", "--namespace", default="", help="default: kubeflow.namespace")
    sub.add_argument(
        "--token-file", default="", help="bearer token file (default: $KF_PIPELINES_TOKEN)"
    )
    if not run:
        return
    sub.add_argument(
        "-p", "--param", action="append", default=[], metavar="NAME=VALUE",
        help="a pipeline parameter (repeatable)",
    )  # fmt: skip
    sub.add_argument("--experiment", default="", help="default: kubeflow.experiment")
    sub.add_argument("--image", default="", help="default: kubeflow.image, else ours")
    sub.add_argument("--pipeline-name", default="", help="default: fineserve-training")
    sub.add_argument("--version-name", default="", help="default: <pipeline>-<timestamp>")


def _add_schedule_parser(commands) -> None:
    schedule_cmd = commands.add_parser(
        "schedule", help="KFP recurring runs of the pipeline (retraining on a schedule)"
    )
    actions = schedule_cmd.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="upload a pinned version and run it on a cron or an interval"
    )
    create.add_argument("name", help="the recurring run's name")
    create.add_argument(
        "--cron", default="", help="Unix cron (5 fields, e.g. '0 3 * * *') or KFP's 6 fields"
    )
    create.add_argument("--every", default="", help="an interval instead: 3600, 90m, 6h, 1d")
    create.add_argument(
        "--catchup", action="store_true", help="run the missed intervals after a pause"
    )
    _add_kubeflow_arguments(create)
    create.set_defaults(func=_schedule)
    listed = actions.add_parser("list", help="recurring runs with their triggers and next runs")
    _add_kubeflow_arguments(listed, run=False)
    listed.set_defaults(func=_schedule)
    for action in ("disable", "enable", "delete"):
        sub = actions.add_parser(action, help=f"{action} a recurring run")
        sub.add_argument("id", help="the recurring run's id (schedule list)")
        _add_kubeflow_arguments(sub, run=False)
        sub.set_defaults(func=_schedule)


def _add_rollout_parser(commands) -> None:
    rollout_cmd = commands.add_parser(
        "rollout",
        help="show, shift, promote or roll back a canary (and keep MLflow's aliases in step)",
    )
    actions = rollout_cmd.add_subparsers(dest="action", required=True)
    helps = {
        "status": "revisions or canaries, versions, traffic, readiness, aliases",
        "set": "give the canary PERCENT of traffic (the stable version gets the rest)",
        "promote": "the canary serves everything; its version becomes champion",
        "rollback": "all traffic back to the stable version; champion stays",
        "analyze": "step the canary's traffic up while Prometheus says it is healthy; promote "
        "at the end, roll back after --threshold failed checks",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", help="the InferenceService")
        if action == "set":
            sub.add_argument("percent", type=int, help="the canary's share, 0-100")
        if action in ("status", "analyze"):
            sub.add_argument("-o", "--output", choices=("table", "json"), default="table")
        if action == "analyze":
            _add_analyze_arguments(sub)
        sub.add_argument("-n", "--namespace", default="", help="default: the context's")
        sub.add_argument("--context", default="", help="kubeconfig context (default: current)")
        sub.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
        )
        sub.add_argument(
            "--request-timeout", type=_seconds, default=READ_TIMEOUT, metavar="SECONDS",
            help="how long each request to the Kubernetes API"
            + (" or Prometheus" if action == "analyze" else "")
            + f" may wait for its answer (default {READ_TIMEOUT:g})",
        )  # fmt: skip
        sub.set_defaults(func=_analyze if action == "analyze" else _rollout)


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The `fineserve` command line."""
    from fineserve.serving.entrypoint import add_serve_arguments

    parser = argparse.ArgumentParser(prog="fineserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compile_cmd = commands.add_parser("compile", help="write the pipeline IR YAML for Kubeflow")
    compile_cmd.add_argument("-o", "--output", default="training.yaml", help="output file")
    compile_cmd.add_argument(
        "--image", default="", help="image of every step and the predictor (default: "
        "kubeflow.image of --params, else $FINESERVE_IMAGE, else ours)",
    )  # fmt: skip
    compile_cmd.add_argument(
        "--params", metavar="FILE.yaml", help="a params file whose `kubeflow:` section sets "
        "the cluster plumbing (secrets, cache volume, GPU nodes, timeouts)",
    )  # fmt: skip
    compile_cmd.set_defaults(func=_compile)

    submit_cmd = commands.add_parser(
        "submit", help="upload the pipeline as a new version to Kubeflow and start a run"
    )
    _add_kubeflow_arguments(submit_cmd)
    submit_cmd.add_argument("--run-name", default="", help="default: fineserve-<timestamp>")
    submit_cmd.set_defaults(func=_submit)

    _add_schedule_parser(commands)

    run_cmd = commands.add_parser("run", help="run the training pipeline")
    run_cmd.add_argument(
        "--local", action="store_true", help="run here with kfp.local.SubprocessRunner"
    )
    run_cmd.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter (repeatable); `fineserve params` lists them",
    )
    run_cmd.add_argument("--params", metavar="FILE.yaml", help="pipeline parameters from YAML")
    run_cmd.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="stream every step's full output (always written to the run's log file)",
    )
    run_cmd.add_argument(
        "--output-dir",
        default=".",
        help="where local_outputs/, mlflow.db and mlartifacts/ go (default: here)",
    )
    run_cmd.set_defaults(func=_run)

    params_cmd = commands.add_parser(
        "params", help="list pipeline parameters with their cluster and local defaults"
    )
    params_cmd.set_defaults(func=_params)

    _add_rollout_parser(commands)

    serve_cmd = commands.add_parser("serve", help="serve a model with the KServe predictor")
    add_serve_arguments(serve_cmd)
    serve_cmd.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `fineserve` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ParameterError, DataError, RegistryError, ClusterError) as err:
        print(f"fineserve {args.command}: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except RuntimeError as err:  # kfp.local: a step failed; its log above says why
        if "finished with status" not in str(err):
            raise
        print(f"fineserve {args.command}: {err}", file=sys.stderr)
        raise SystemExit(1) from err
