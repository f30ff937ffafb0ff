"""fineserve: fine-tune, evaluate, register and serve text classifiers on Kubeflow and KServe."""

__version__ = "0.1.0"
