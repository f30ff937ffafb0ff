"""fineserve: fine-tune, evaluate, register and serve text classifiers on Kubeflow and KServe.

Layers, bottom up (a module imports only from its own layer or those below):
`fineserve.core` → `fineserve.serving` → `fineserve.components` → `fineserve.pipelines` →
`fineserve.cli`. See docs/architecture.md.
"""

__version__ = "0.1.0"
