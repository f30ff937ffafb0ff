"""MLflow "model from code": the registered version as a pyfunc over its HF directory.

Logged with `mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"hf_model": dir})`,
so `mlflow.pyfunc.load_model("models:/NAME@challenger").predict(["some text"])` works with only
MLflow and transformers installed. KServe loads `artifacts/hf_model` directly instead.
This file is loaded on its own, without fineserve, so it needs nothing from it, except for a
model with fineserve's mean-pooling head (all-MiniLM and other sentence-embedding bases),
whose class fineserve registers with transformers when it is installed.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TransformersPyfunc(PythonModel):
    """Text in, `label` (class name) and `score` (its probability) out."""

    def load_context(self, context) -> None:
        """Build a transformers text-classification pipeline over the `hf_model` artifact."""
        import contextlib

        from transformers import pipeline

        # the mean-pooling head's class, registered with transformers' Auto classes
        with contextlib.suppress(ImportError):
            import fineserve.serving.pooling  # noqa: F401
        self._classify = pipeline("text-classification", model=context.artifacts["hf_model"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Classify a column (or list) of texts."""
        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].astype(str).tolist()
        else:
            texts = [str(text) for text in model_input]
        results = self._classify(texts, truncation=True)
        return pd.DataFrame(
            {"label": [r["label"] for r in results], "score": [r["score"] for r in results]}
        )


mlflow.models.set_model(TransformersPyfunc())
