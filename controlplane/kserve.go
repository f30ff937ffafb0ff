package main

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/kserve/kserve/pkg/apis/serving/v1alpha1"
	"github.com/kserve/kserve/pkg/apis/serving/v1beta1"
	graphcontroller "github.com/kserve/kserve/pkg/controller/v1alpha1/inferencegraph"
	trainedmodelcontroller "github.com/kserve/kserve/pkg/controller/v1alpha1/trainedmodel"
	"github.com/kserve/kserve/pkg/controller/v1alpha1/trainedmodel/reconcilers/modelconfig"
	v1beta1controller "github.com/kserve/kserve/pkg/controller/v1beta1/inferenceservice"
	kserveutils "github.com/kserve/kserve/pkg/utils"
	"github.com/kserve/kserve/pkg/webhook/admission/pod"
	"github.com/kserve/kserve/pkg/webhook/admission/servingruntime"
)

// newKServeManager builds KServe's controller manager as its own main does
// (github.com/kserve/kserve@v0.20.0 cmd/manager/main.go): the same controllers, the same webhooks
// on the same paths, the same cache options, configured from the inferenceservice-config
// ConfigMap in the cluster. What differs is where it runs: the webhook server listens where
// envtest registered the webhooks (as pkg/testing/config.go does), metrics and probes are off,
// and there is no leader election.
func newKServeManager(cfg *rest.Config, scheme *runtime.Scheme, hooks envtest.WebhookInstallOptions) (ctrl.Manager, error) {
	clientSet, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	cacheOpts, err := v1beta1controller.NewCacheOptions()
	if err != nil {
		return nil, err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:  scheme,
		Metrics: metricsserver.Options{BindAddress: "0"},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host:    hooks.LocalServingHost,
			Port:    hooks.LocalServingPort,
			CertDir: hooks.LocalServingCertDir,
		}),
		Cache: cacheOpts,
	})
	if err != nil {
		return nil, err
	}

	isvcConfigMap, err := v1beta1.GetInferenceServiceConfigMap(context.Background(), clientSet)
	if err != nil {
		return nil, err
	}
	deployConfig, err := v1beta1.NewDeployConfig(isvcConfigMap)
	if err != nil {
		return nil, fmt.Errorf("deploy config: %w", err)
	}
	ingressConfig, err := v1beta1.NewIngressConfig(isvcConfigMap)
	if err != nil {
		return nil, fmt.Errorf("ingress config: %w", err)
	}
	if _, err := v1beta1.NewMultiNodeConfig(isvcConfigMap); err != nil {
		return nil, fmt.Errorf("multiNode config: %w", err)
	}

	events := record.NewBroadcaster()
	events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: clientSet.CoreV1().Events("")})
	recorder := func(component string) record.EventRecorder {
		return events.NewRecorder(mgr.GetScheme(), corev1.EventSource{Component: component})
	}
	if err := (&v1beta1controller.InferenceServiceReconciler{
		Client:    mgr.GetClient(),
		Clientset: clientSet,
		Log:       ctrl.Log.WithName("v1beta1Controllers").WithName("InferenceService"),
		Scheme:    mgr.GetScheme(),
		Recorder:  recorder("v1beta1Controllers"),
	}).SetupWithManager(mgr, deployConfig, ingressConfig); err != nil {
		return nil, fmt.Errorf("InferenceService controller: %w", err)
	}
	if err := (&trainedmodelcontroller.TrainedModelReconciler{
		Client:                mgr.GetClient(),
		Log:                   ctrl.Log.WithName("v1beta1Controllers").WithName("TrainedModel"),
		Scheme:                mgr.GetScheme(),
		Recorder:              recorder("v1beta1Controllers"),
		ModelConfigReconciler: modelconfig.NewModelConfigReconciler(mgr.GetClient(), clientSet, mgr.GetScheme()),
	}).SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("TrainedModel controller: %w", err)
	}
	if err := (&graphcontroller.InferenceGraphReconciler{
		Client:    mgr.GetClient(),
		Clientset: clientSet,
		Log:       ctrl.Log.WithName("v1alpha1Controllers").WithName("InferenceGraph"),
		Scheme:    mgr.GetScheme(),
		Recorder:  recorder("InferenceGraphController"),
	}).SetupWithManager(mgr, deployConfig); err != nil {
		return nil, fmt.Errorf("InferenceGraph controller: %w", err)
	}

	hookServer := mgr.GetWebhookServer()
	decoder := admission.NewDecoder(mgr.GetScheme())
	hookServer.Register("/mutate-pods", &webhook.Admission{
		Handler: &pod.Mutator{Client: mgr.GetClient(), Clientset: clientSet, Decoder: decoder},
	})
	csrAvailable, err := kserveutils.IsCrdAvailable(mgr.GetConfig(), v1alpha1.SchemeGroupVersion.String(), "ClusterServingRuntime")
	if err != nil {
		return nil, err
	}
	if csrAvailable {
		hookServer.Register("/validate-serving-kserve-io-v1alpha1-clusterservingruntime", &webhook.Admission{
			Handler: &servingruntime.ClusterServingRuntimeValidator{Client: mgr.GetClient(), Decoder: decoder},
		})
	}
	hookServer.Register("/validate-serving-kserve-io-v1alpha1-servingruntime", &webhook.Admission{
		Handler: &servingruntime.ServingRuntimeValidator{Client: mgr.GetClient(), Decoder: decoder},
	})
	if err := ctrl.NewWebhookManagedBy(mgr).For(&v1alpha1.TrainedModel{}).
		WithValidator(&v1alpha1.TrainedModelValidator{}).Complete(); err != nil {
		return nil, err
	}
	if err := ctrl.NewWebhookManagedBy(mgr).For(&v1alpha1.InferenceGraph{}).
		WithValidator(&v1alpha1.InferenceGraphValidator{}).Complete(); err != nil {
		return nil, err
	}
	if err := ctrl.NewWebhookManagedBy(mgr).For(&v1beta1.InferenceService{}).
		WithDefaulter(&v1beta1.InferenceServiceDefaulter{}).
		WithValidator(&v1beta1.InferenceServiceValidator{}).Complete(); err != nil {
		return nil, err
	}
	return mgr, nil
}
