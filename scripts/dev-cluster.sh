#!/usr/bin/env bash
# Run the test control plane in the foreground: kube-apiserver, etcd, kube-controller-manager's
# workload controllers, KServe's controller and admission webhooks, and a stand-in kubelet, all on
# 127.0.0.1 (docs/control-plane.md). Builds what is missing first (scripts/build-control-plane.sh).
# Prints `export KUBECONFIG=PATH` once the API answers and KServe's webhooks serve; Ctrl-C or
# SIGTERM stops every process it started. Options go to the driver (e.g. --zap-log-level=error,
# --run-dir=DIR to keep the kubeconfig and logs).
set -euo pipefail
assets=$(bash "$(dirname "$0")/build-control-plane.sh")
exec "$assets/bin/controlplane" --assets="$assets" "$@"
