"""The training DAG and its compile / local-run entry points."""
