"""KFP components, one module per step, each a documented `@component` function on helpers.

The `@component` function documents every argument and does the step; its plain helper
functions are what the unit tests call. A step reads its predecessors' artifacts through
`fineserve.core.artifacts`, never by importing another step's module.
"""
