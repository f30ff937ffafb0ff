"""KServe predictor for fineserve models (run as `python -m serving`).

`serving.cli` holds the command lines, `serving.predictor` the `kserve.Model`,
`serving.batcher` the dynamic batcher and `serving.engine` the tokenizer + model.
"""
