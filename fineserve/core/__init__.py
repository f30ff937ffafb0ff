"""The bottom layer: defaults, errors, the artifact contract and MLflow registry operations.

Everything else in fineserve builds on these modules; they import nothing from the layers above.
"""
