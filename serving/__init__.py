"""KServe predictor for fineserve models (run as `python -m serving`)."""
