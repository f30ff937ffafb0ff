"""KFP components: plain functions that do the work, plus thin @dsl.component wrappers."""
