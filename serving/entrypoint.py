"""Command lines: `python -m fineserve.serving` (KServe style) and `fineserve serve`."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from fineserve.serving.compiled import COMPILE_MODES
from fineserve.serving.engine import UNPAD_MODES
from fineserve.serving.forward_processes import FORWARD_IN
from fineserve.serving.precision import PRECISIONS
from fineserve.serving.predictor import ServeOptions

_DEFAULTS = ServeOptions()
#: (option, type, help) of the predictor knobs; defaults come from ServeOptions.
_KNOBS: list[tuple[str, type, str]] = [
    ("max_batch_size", int, "Most texts coalesced into one batch; 1 turns batching off."),
    ("max_batch_wait_ms", float, "Longest a request waits, from its arrival, for company."),
    (
        "forward_workers",
        int,
        "Forward passes run at once; 0: 2 on CPU (cores split between them), 1 on GPU.",
    ),
    (
        "max_batch_tokens",
        int,
        "Most padded tokens (texts x longest) per forward pass; 0: 512 on CPU, 16384 on GPU.",
    ),
    ("max_texts_per_request", int, "Most texts in one request; more is a 400."),
    ("max_request_bytes", int, "Largest request body; larger is a 413."),
    (
        "probe_texts",
        int,
        "Texts of the model's own test split (stored with it at registration) a reduced "
        "precision is checked on against float32 at load; 0: no check (a precision named by "
        "--dtype is trusted; auto serves float32 on a CPU).",
    ),
    (
        "probe_min_agreement",
        float,
        "Least share of probe texts whose class a reduced precision must keep, else float32.",
    ),
    (
        "probe_max_probability_diff",
        float,
        "Most a reduced precision may move any probability on the probe texts, else float32.",
    ),
    (
        "probe_tie_margin",
        float,
        "A probe text whose class changes to one float32 rated within this of its own is a "
        "near-tie and does not count against the agreement.",
    ),
]
_DEVICES = ("auto", "cpu", "cuda")


def _add_knobs(parser: argparse.ArgumentParser, sep: str) -> None:
    group = parser.add_argument_group("predictor")
    for name, kind, text in _KNOBS:
        default = getattr(_DEFAULTS, name)
        flag = "--" + name.replace("_", sep)
        group.add_argument(flag, dest=name, type=kind, default=default, help=f"{text} ({default})")
    group.add_argument(
        "--device", choices=_DEVICES, default="auto", help="auto: CUDA when present, else CPU."
    )
    group.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="auto: bfloat16 where the hardware runs it natively (CUDA, or a CPU with AMX or "
        "AVX-512 BF16) and the probe passes, else float32. int8: dynamic quantization of the "
        "Linear layers (CPU). Any reduced precision falls back to float32 if the probe fails.",
    )
    group.add_argument(
        f"--enable{sep}model{sep}repository",
        dest="enable_model_repository",
        action="store_true",
        help="Allow the repository API (load/unload of the model) over HTTP and gRPC; off, "
        "they answer 403 / PERMISSION_DENIED.",
    )
    group.add_argument(
        "--unpad",
        choices=UNPAD_MODES,
        default="auto",
        help="auto: Linear layers skip padding rows when a load-time check shows equal outputs.",
    )
    group.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="auto",
        help="auto: torch.compile (inductor, frozen weights) a model served in bfloat16 on a "
        "CPU, eager if compiling fails; on: compile in any precision, refuse to load if it "
        "fails; off: eager. Compiling adds 15-35 s to the load; compiled passes run padded.",
    )
    group.add_argument(
        f"--forward{sep}in",
        dest="forward_in",
        choices=FORWARD_IN,
        default="auto",
        help="Where forward passes run. processes: one child process per forward worker, each "
        "with its own copy of the model, so passes share no GIL with the HTTP event loop "
        "(more memory, a longer load); threads: worker threads in the server process. auto: "
        "processes on a CPU, threads on a GPU.",
    )


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The ServeOptions named by parsed knob arguments."""
    return ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})


def build_parser() -> argparse.ArgumentParser:
    """`python -m fineserve.serving`: KServe's ModelServer options, --model_dir, the knobs."""
    from kserve import model_server

    parser = argparse.ArgumentParser(
        prog="python -m fineserve.serving",
        parents=[model_server.parser],
        description="Serve a fineserve text classifier with KServe (v1/v2 REST, v2 gRPC).",
    )
    parser.add_argument("--model_dir", required=True, help="HF directory (or an MLflow model).")
    # 3 log lines a request; /metrics has the latencies. (The option object is KServe's own,
    # shared with its module parser, which has parsed sys.argv already at import.)
    parser.set_defaults(enable_latency_logging=False)
    _add_knobs(parser, "_")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m fineserve.serving`."""
    from fineserve.serving.model_uri import find_hf_dir
    from fineserve.serving.server import serve

    args = build_parser().parse_args(argv)
    serve(
        find_hf_dir(args.model_dir),
        model_name=args.model_name,
        options=options_from_args(args),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fineserve serve`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", dest="model_dir", help="Local HF directory to serve.")
    source.add_argument(
        "--model-uri",
        dest="model_uri",
        help="MLflow URI to download and serve (models:/NAME@ALIAS, models:/NAME/VERSION, ...).",
    )
    parser.add_argument(
        "--model-name",
        dest="model_name",
        default=None,
        help="Name on the endpoint path (default: NAME of a models:/ URI, else 'model').",
    )
    parser.add_argument(
        "--tracking-uri",
        dest="tracking_uri",
        default=None,
        help="MLflow tracking URI for --model-uri (default: $MLFLOW_TRACKING_URI, else "
        "./mlflow.db as `fineserve run --local` writes it).",
    )
    parser.add_argument("--http-port", dest="http_port", type=int, default=8080)
    parser.add_argument("--grpc-port", dest="grpc_port", type=int, default=8081)
    _add_knobs(parser, "-")


def default_model_name(model_uri: str | None) -> str:
    """NAME of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; otherwise "model"."""
    from fineserve.core.registry import MODELS_SCHEME, parse_models_uri

    if model_uri and model_uri.startswith(MODELS_SCHEME):
        return parse_models_uri(model_uri)[0] or "model"
    return "model"


def run_serve(args: argparse.Namespace) -> None:
    """Resolve the model (downloading a --model-uri through MLflow), then serve it."""
    from fineserve.core.registry import mlflow_client, pin_registry_version, resolve_tracking_uri
    from fineserve.serving.model_uri import find_hf_dir, resolve_model_dir
    from fineserve.serving.server import serve

    options = options_from_args(args)  # fail on bad knobs before any download
    version = None
    if args.model_uri:
        import mlflow

        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        uri, version = pin_registry_version(args.model_uri, mlflow_client(tracking_uri))
        model_dir = resolve_model_dir(uri)
    else:
        model_dir = find_hf_dir(Path(args.model_dir))
    serve(
        model_dir,
        model_name=args.model_name or default_model_name(args.model_uri),
        options=options,
        model_version=version,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
    )
