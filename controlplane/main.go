// Command controlplane runs a Kubernetes control plane for fineserve's tests on 127.0.0.1:
// kube-apiserver and etcd (started by controller-runtime's envtest from binaries built from Go
// modules), kube-controller-manager's workload controllers, KServe's own InferenceService
// controller and admission webhooks, and stand-ins for the kubelet (pod status) and for a
// Gateway API implementation (HTTPRoute status). It prints
// `export KUBECONFIG=PATH` once the API answers and KServe's webhooks serve, and stops every
// process it started on SIGINT, SIGTERM or (with -exit-on-stdin-eof) when its stdin closes.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/yaml"

	"github.com/kserve/kserve/pkg/constants"
	kservescheme "github.com/kserve/kserve/pkg/scheme"
)

var log = ctrl.Log.WithName("controlplane")

func main() {
	assets := flag.String("assets", "", "folder with bin/ (kube-apiserver, etcd, kube-controller-manager), "+
		"crds/, webhooks/ and config/, as scripts/build-control-plane.sh lays it out")
	runDir := flag.String("run-dir", "", "folder for the kubeconfig and the logs of the processes; "+
		"default: a new temporary folder, removed on exit")
	stdinEOF := flag.Bool("exit-on-stdin-eof", false, "stop when stdin closes (as it does when the parent process dies)")
	gatewayAPI := flag.Bool("gateway-api", true, "KServe's Standard mode writes HTTPRoutes to the Gateway "+
		"kserve/kserve-ingress-gateway (enableGatewayApi in inferenceservice-config), as the README asks of a "+
		"cluster; false: KServe's shipped setting, Ingress objects")
	zapOpts := zap.Options{}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
	if *assets == "" {
		fmt.Fprintln(os.Stderr, "controlplane: -assets is required")
		os.Exit(2)
	}
	temporary := *runDir == ""
	if temporary {
		dir, err := os.MkdirTemp("", "fineserve-controlplane-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "controlplane:", err)
			os.Exit(1)
		}
		*runDir = dir
	}
	if err := run(*assets, *runDir, *stdinEOF, *gatewayAPI); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v (logs in %s)\n", err, *runDir)
		os.Exit(1)
	}
	if temporary {
		_ = os.RemoveAll(*runDir)
	}
}

// run starts everything, waits for a stop request, and stops everything it started.
func run(assets, runDir string, stdinEOF, gatewayAPI bool) (err error) {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			cancel()
		}()
	}

	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, kservescheme.AddAll} {
		if err := add(scheme); err != nil {
			return err
		}
	}
	// Set up the way KServe's controller suites do (pkg/testing/config.go, BuildEnvironment), with
	// the binaries we built instead of downloaded ones, and KServe's webhook manifests
	// (config/webhook/manifests.yaml) pointed at the webhook server started below.
	env := &envtest.Environment{
		BinaryAssetsDirectory: filepath.Join(assets, "bin"),
		Scheme:                scheme,
		CRDInstallOptions: envtest.CRDInstallOptions{
			Paths:              []string{filepath.Join(assets, "crds")},
			ErrorIfPathMissing: true,
			Scheme:             scheme,
			MaxTime:            2 * time.Minute,
		},
		WebhookInstallOptions: envtest.WebhookInstallOptions{
			Paths:            []string{filepath.Join(assets, "webhooks")},
			LocalServingHost: "127.0.0.1",
			MaxTime:          2 * time.Minute,
		},
		ControlPlaneStartTimeout: 2 * time.Minute,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	apiserverLog, err := os.Create(filepath.Join(runDir, "kube-apiserver.log"))
	if err != nil {
		return err
	}
	defer apiserverLog.Close()
	etcdLog, err := os.Create(filepath.Join(runDir, "etcd.log"))
	if err != nil {
		return err
	}
	defer etcdLog.Close()
	env.ControlPlane.APIServer = &envtest.APIServer{Out: apiserverLog, Err: apiserverLog}
	env.ControlPlane.Etcd = &envtest.Etcd{Out: etcdLog, Err: etcdLog}
	started := time.Now()
	cfg, err := env.Start()
	defer func() {
		if stopErr := env.Stop(); stopErr != nil && err == nil {
			err = fmt.Errorf("stopping kube-apiserver and etcd: %w", stopErr)
		}
	}()
	if err != nil {
		return fmt.Errorf("starting kube-apiserver and etcd: %w", err)
	}
	log.Info("kube-apiserver answers", "host", cfg.Host, "after", time.Since(started).Round(time.Millisecond))

	kubeconfig := filepath.Join(runDir, "kubeconfig")
	// The kubeconfig is written at once (the controller manager needs it) but announced only
	// when KServe's webhooks serve.
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		return err
	}
	// KServe's defaulting webhook builds its own client from controller-runtime's config.GetConfig
	// (pkg/apis/serving/v1beta1/inference_service_defaults.go), in a pod from the in-cluster
	// config; here from KUBECONFIG.
	if err := os.Setenv("KUBECONFIG", kubeconfig); err != nil {
		return err
	}

	cli, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return err
	}
	if err := seedCluster(ctx, cli, assets, gatewayAPI); err != nil {
		return err
	}

	kcm, err := startControllerManager(filepath.Join(assets, "bin", "kube-controller-manager"), kubeconfig, runDir)
	if err != nil {
		return err
	}
	defer kcm.stop()

	kserve, err := newKServeManager(cfg, scheme, env.WebhookInstallOptions)
	if err != nil {
		return err
	}
	standIns, err := newStandIns(cfg, scheme)
	if err != nil {
		return err
	}
	ctx, stopManagers := context.WithCancel(ctx)
	managers := map[string]ctrl.Manager{"KServe's controller manager": kserve, "the stand-ins": standIns}
	exited := make(chan error, len(managers))
	for name, mgr := range managers {
		go func() {
			if err := mgr.Start(ctx); err != nil {
				exited <- fmt.Errorf("%s: %w", name, err)
				return
			}
			exited <- nil
		}()
	}
	running := len(managers)
	defer func() {
		stopManagers()
		for ; running > 0; running-- {
			if mgrErr := <-exited; mgrErr != nil && err == nil {
				err = mgrErr
			}
		}
	}()

	hostPort := net.JoinHostPort(env.WebhookInstallOptions.LocalServingHost,
		strconv.Itoa(env.WebhookInstallOptions.LocalServingPort))
	if err := waitForTLS(ctx, hostPort, 2*time.Minute); err != nil {
		return fmt.Errorf("KServe's webhook server on %s: %w", hostPort, err)
	}
	log.Info("control plane ready", "after", time.Since(started).Round(time.Millisecond))
	fmt.Printf("export KUBECONFIG=%s\n", kubeconfig)

	select {
	case <-ctx.Done():
		log.Info("stopping")
		return nil
	case mgrErr := <-exited:
		running--
		return fmt.Errorf("stopped early: %v", mgrErr)
	case <-kcm.exited:
		return fmt.Errorf("kube-controller-manager exited: %v (log: %s)", kcm.err, kcm.logPath)
	}
}

// seedCluster creates what a KServe installation brings besides CRDs and webhooks: its namespace
// and inferenceservice-config ConfigMap (config/configmap/inferenceservice.yaml, as shipped, but
// for enableGatewayApi with gatewayAPI, and then the Gateway), and, as KServe's controller suite
// does (suite_test.go, BeforeSuite), Knative Serving's namespace with an empty config-autoscaler
// (Knative's defaults apply).
func seedCluster(ctx context.Context, cli client.Client, assets string, gatewayAPI bool) error {
	raw, err := os.ReadFile(filepath.Join(assets, "config", "inferenceservice.yaml"))
	if err != nil {
		return err
	}
	isvcConfig := &corev1.ConfigMap{}
	if err := yaml.UnmarshalStrict(raw, isvcConfig); err != nil {
		return fmt.Errorf("KServe's inferenceservice-config: %w", err)
	}
	objects := []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: constants.KServeNamespace}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: constants.DefaultKnServingNamespace}},
		isvcConfig,
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{
			Name: constants.AutoscalerConfigmapName, Namespace: constants.AutoscalerConfigmapNamespace}},
	}
	if gatewayAPI {
		if err := enableGatewayAPI(isvcConfig); err != nil {
			return err
		}
		gw, err := ingressGateway(isvcConfig)
		if err != nil {
			return err
		}
		objects = append(objects, gw)
	}
	for _, obj := range objects {
		if err := cli.Create(ctx, obj); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating %T %s: %w", obj, obj.GetName(), err)
		}
	}
	return nil
}

// waitForTLS waits until a TLS server answers on hostPort, as KServe's envtest helper waits for
// its webhook server (pkg/testing/config.go, Start).
func waitForTLS(ctx context.Context, hostPort string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	dialer := &net.Dialer{Timeout: time.Second}
	for {
		conn, err := tls.DialWithDialer(dialer, "tcp", hostPort, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // a readiness probe only
		if err == nil {
			return conn.Close()
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.New("stopped while waiting")
		case <-time.After(200 * time.Millisecond):
		}
	}
}
