"""KServe predictor for fineserve models (run as `python -m fineserve.serving`).

`entrypoint` holds the command lines, `predictor` the `kserve.Model`, `batcher` the dynamic
batcher, `engine` the tokenizer + model, `prometheus_metrics` what `/metrics` adds.
"""
