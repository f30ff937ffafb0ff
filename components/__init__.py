"""KFP components, one module per step: a `@component` function that documents every argument
and does the step, on plain helper functions that the tests call directly.

A step reads its predecessors' artifacts through `fineserve.core.artifacts`, never by importing
another step's module.
"""
