package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// kubeControllers are the kube-controller-manager controllers that run: those that turn a
// Deployment into ReplicaSets and Pods and report its status (what KServe reads in Standard
// mode), the HorizontalPodAutoscaler's, the garbage collector (deleting an InferenceService deletes
// what it owns), the namespace controller (deleting a namespace empties it), the default
// ServiceAccount, and EndpointSlices. Names: k8s.io/kubernetes cmd/kube-controller-manager/names.
var kubeControllers = []string{
	"deployment-controller",
	"replicaset-controller",
	"horizontal-pod-autoscaler-controller",
	"garbage-collector-controller",
	"namespace-controller",
	"serviceaccount-controller",
	"endpointslice-controller",
}

type controllerManager struct {
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has exited; err then says how
	err     error
	logPath string
}

// startControllerManager runs kube-controller-manager against the API server in kubeconfig,
// logging to a file in logDir. It serves nothing (secure port 0) and is killed if this
// process dies.
func startControllerManager(binary, kubeconfig, logDir string) (*controllerManager, error) {
	logPath := filepath.Join(logDir, "kube-controller-manager.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(binary,
		"--kubeconfig="+kubeconfig,
		"--controllers="+strings.Join(kubeControllers, ","),
		"--leader-elect=false",
		"--secure-port=0",
		"--use-service-account-credentials=false",
		"--v=1",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so that a terminal's Ctrl-C reaches only us and we stop it in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logFile.Close()
		return nil, fmt.Errorf("starting kube-controller-manager: %w", err)
	}
	kcm := &controllerManager{cmd: cmd, exited: make(chan struct{}), logPath: logPath}
	go func() {
		kcm.err = cmd.Wait()
		_ = logFile.Close()
		close(kcm.exited)
	}()
	return kcm, nil
}

// stop asks kube-controller-manager to stop and kills it if it has not within 10 seconds.
func (k *controllerManager) stop() {
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-k.exited:
	case <-time.After(10 * time.Second):
		_ = k.cmd.Process.Kill()
		<-k.exited
	}
}
