"""`python -m fineserve.serving` with the per-prediction metrics off: serve_bench's baseline.

    python benchmarks/no_prediction_metrics.py --model_name NAME --model_dir DIR ...

`ModelMetrics.observe_predictions` (the label counter and the top-probability histogram, per
text answered) becomes a no-op; everything else is the predictor as shipped.
"""

from fineserve.serving.entrypoint import main
from fineserve.serving.prometheus_metrics import ModelMetrics

ModelMetrics.observe_predictions = lambda self, probabilities: None

if __name__ == "__main__":
    main()
