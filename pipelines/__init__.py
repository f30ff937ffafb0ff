"""The training DAG, its parameters, and the local runner."""
