package main

import (
	"context"
	"fmt"
	"hash/fnv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

const (
	// nodeName is the one node; the stand-in kubelet binds every pod to it.
	nodeName = "fineserve-node"
	// behaviourConfigMap names the ConfigMap, in a pod's namespace, that says how the pods of a
	// Deployment behave: key the Deployment's name, value one of the behaviours below.
	behaviourConfigMap = "fake-kubelet"

	behaviourReady    = "ready"     // containers start and pass their readiness probes (the default)
	behaviourNotReady = "not-ready" // containers run but never pass their readiness probes
	behaviourCrash    = "crash"     // the main container exits 1 and restarts in CrashLoopBackOff
	// mainContainer is the container KServe reads model status from
	// (constants.InferenceServiceContainerName); it is the one that crashes.
	mainContainer = "kserve-container"
)

// kubelet plays the part of the kubelet (and of the scheduler) for pods that
// kube-controller-manager creates: it binds each pod to the one node and reports container
// states as a kubelet would, per the behaviour the fake-kubelet ConfigMap names for the pod's
// Deployment, and removes pods whose deletion was requested. No container runs.
type kubelet struct {
	client.Client
	clientset kubernetes.Interface
}

// newStandIns builds a manager for the stand-ins of what does not run here, the kubelet and a
// Gateway API implementation. It is a manager of its own: KServe's caches only InferenceService
// pods (cache_config.go), the kubelet needs all of them.
func newStandIns(cfg *rest.Config, scheme *runtime.Scheme) (ctrl.Manager, error) {
	clientset, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		return nil, err
	}
	k := &kubelet{Client: mgr.GetClient(), clientset: clientset}
	if err := mgr.Add(k.registerNode()); err != nil {
		return nil, err
	}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("kubelet").
		For(&corev1.Pod{}).
		Watches(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(k.podsOfNamespace)).
		Complete(k); err != nil {
		return nil, err
	}
	return mgr, addGateway(mgr)
}

// registerNode creates the node with a Ready status, as a kubelet registers itself.
func (k *kubelet) registerNode() manager.RunnableFunc {
	return func(ctx context.Context) error {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name:   nodeName,
			Labels: map[string]string{corev1.LabelHostname: nodeName, corev1.LabelOSStable: "linux"},
		}}
		if err := k.Create(ctx, node); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("registering node %s: %w", nodeName, err)
		}
		capacity := corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("64"),
			corev1.ResourceMemory: resource.MustParse("256Gi"),
			corev1.ResourcePods:   resource.MustParse("500"),
		}
		node.Status = corev1.NodeStatus{
			Capacity:    capacity,
			Allocatable: capacity,
			Conditions: []corev1.NodeCondition{{
				Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
				Message: "kubelet is posting ready status", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
			}},
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}},
		}
		if err := k.Status().Update(ctx, node); err != nil {
			return fmt.Errorf("node %s status: %w", nodeName, err)
		}
		<-ctx.Done()
		return nil
	}
}

// podsOfNamespace maps a change of a fake-kubelet ConfigMap to the pods of its namespace.
func (k *kubelet) podsOfNamespace(ctx context.Context, obj client.Object) []reconcile.Request {
	if obj.GetName() != behaviourConfigMap {
		return nil
	}
	pods := &corev1.PodList{}
	if err := k.List(ctx, pods, client.InNamespace(obj.GetNamespace())); err != nil {
		return nil
	}
	requests := make([]reconcile.Request, 0, len(pods.Items))
	for _, pod := range pods.Items {
		requests = append(requests, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&pod)})
	}
	return requests
}

func (k *kubelet) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	pod := &corev1.Pod{}
	if err := k.Get(ctx, req.NamespacedName, pod); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if pod.DeletionTimestamp != nil {
		// The containers are "stopped": finish the graceful deletion, as a kubelet does.
		zero := int64(0)
		err := k.clientset.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name,
			metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &pod.UID}})
		return reconcile.Result{}, ignoreGone(err)
	}
	if pod.Spec.NodeName == "" {
		binding := &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: nodeName},
		}
		// The binding's update of the pod requeues it.
		return reconcile.Result{}, ignoreGone(k.clientset.CoreV1().Pods(pod.Namespace).Bind(ctx, binding, metav1.CreateOptions{}))
	}
	behaviour, message, err := k.behaviourOf(ctx, pod)
	if err != nil {
		return reconcile.Result{}, err
	}
	status := podStatus(pod, behaviour, message)
	if equality.Semantic.DeepEqual(status, pod.Status) {
		return reconcile.Result{}, nil
	}
	pod.Status = status
	return reconcile.Result{}, ignoreGone(k.Status().Update(ctx, pod))
}

// behaviourOf reads what the fake-kubelet ConfigMap says of the pod's Deployment
// ("crash: model not found" is behaviour "crash" with a message), "ready" when it says nothing.
func (k *kubelet) behaviourOf(ctx context.Context, pod *corev1.Pod) (string, string, error) {
	deployment, err := k.deploymentOf(ctx, pod)
	if err != nil || deployment == "" {
		return behaviourReady, "", err
	}
	config := &corev1.ConfigMap{}
	if err := k.Get(ctx, types.NamespacedName{Namespace: pod.Namespace, Name: behaviourConfigMap}, config); err != nil {
		return behaviourReady, "", client.IgnoreNotFound(err)
	}
	value, ok := config.Data[deployment]
	if !ok {
		return behaviourReady, "", nil
	}
	behaviour, message, _ := strings.Cut(value, ":")
	behaviour = strings.TrimSpace(behaviour)
	switch behaviour {
	case behaviourReady, behaviourNotReady, behaviourCrash:
		return behaviour, strings.TrimSpace(message), nil
	}
	// Said where a user looks: on the pod, as a kubelet reports a bad pod spec.
	return behaviourNotReady, fmt.Sprintf("ConfigMap %s/%s: %q is not a behaviour (use %s, %s or %s)",
		pod.Namespace, behaviourConfigMap, value, behaviourReady, behaviourNotReady, behaviourCrash), nil
}

// deploymentOf names the Deployment whose ReplicaSet owns the pod, or "" if none does.
func (k *kubelet) deploymentOf(ctx context.Context, pod *corev1.Pod) (string, error) {
	owner := metav1.GetControllerOf(pod)
	if owner == nil || owner.Kind != "ReplicaSet" {
		return "", nil
	}
	replicaSet := &appsv1.ReplicaSet{}
	if err := k.Get(ctx, types.NamespacedName{Namespace: pod.Namespace, Name: owner.Name}, replicaSet); err != nil {
		return "", client.IgnoreNotFound(err)
	}
	if owner := metav1.GetControllerOf(replicaSet); owner != nil && owner.Kind == "Deployment" {
		return owner.Name, nil
	}
	return "", nil
}

// podStatus is the status a kubelet reports for the pod behaving as said. Init containers have
// completed; containers run, ready or not; in a crash the main container (kserve-container, else
// the first) is in CrashLoopBackOff after exiting 1 with the message, the fields KServe's
// PropagateModelStatus reads (pkg/apis/serving/v1beta1/inference_service_status.go). Times and
// IPs already reported are kept, so that an unchanged pod is not rewritten.
func podStatus(pod *corev1.Pod, behaviour, message string) corev1.PodStatus {
	old := pod.Status
	now := metav1.Now()
	started := now
	if old.StartTime != nil {
		started = *old.StartTime
	}
	crashing := ""
	if behaviour == behaviourCrash {
		crashing = pod.Spec.Containers[0].Name
		for _, c := range pod.Spec.Containers {
			if c.Name == mainContainer {
				crashing = c.Name
			}
		}
	}
	status := corev1.PodStatus{
		Phase:     corev1.PodRunning,
		HostIP:    "127.0.0.1",
		HostIPs:   []corev1.HostIP{{IP: "127.0.0.1"}},
		PodIP:     podIP(pod),
		PodIPs:    []corev1.PodIP{{IP: podIP(pod)}},
		StartTime: &started,
		QOSClass:  old.QOSClass,
	}
	for _, c := range pod.Spec.InitContainers {
		status.InitContainerStatuses = append(status.InitContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: c.Image, ContainerID: containerID(pod, c.Name),
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: started, FinishedAt: started,
				ContainerID: containerID(pod, c.Name)}},
		})
	}
	var unready []string
	for _, c := range pod.Spec.Containers {
		cs := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: c.Image, ContainerID: containerID(pod, c.Name)}
		switch {
		case c.Name == crashing:
			if message == "" {
				message = "the container exited with code 1"
			}
			cs.RestartCount = 5
			cs.State.Waiting = &corev1.ContainerStateWaiting{
				Reason:  "CrashLoopBackOff",
				Message: fmt.Sprintf("back-off 2m40s restarting failed container=%s pod=%s_%s(%s)", c.Name, pod.Name, pod.Namespace, pod.UID),
			}
			cs.LastTerminationState.Terminated = &corev1.ContainerStateTerminated{
				ExitCode: 1, Reason: "Error", Message: message, StartedAt: started, FinishedAt: started,
				ContainerID: containerID(pod, c.Name),
			}
		default:
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: started}
			cs.Started = ptr.To(true)
			cs.Ready = behaviour == behaviourReady
		}
		if !cs.Ready {
			unready = append(unready, c.Name)
		}
		if prev := findStatus(old.ContainerStatuses, c.Name); prev != nil && equality.Semantic.DeepEqual(prev.State, cs.State) {
			cs = *prev
		}
		status.ContainerStatuses = append(status.ContainerStatuses, cs)
	}
	ready := corev1.ConditionTrue
	reason, readyMessage := "", ""
	if len(unready) > 0 {
		ready, reason = corev1.ConditionFalse, "ContainersNotReady"
		readyMessage = fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
		if behaviour == behaviourNotReady && message != "" {
			readyMessage = message
		}
	}
	for _, cond := range []corev1.PodCondition{
		{Type: corev1.PodReadyToStartContainers, Status: corev1.ConditionTrue},
		{Type: corev1.PodInitialized, Status: corev1.ConditionTrue},
		{Type: corev1.PodReady, Status: ready, Reason: reason, Message: readyMessage},
		{Type: corev1.ContainersReady, Status: ready, Reason: reason, Message: readyMessage},
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue},
	} {
		cond.LastTransitionTime = now
		for _, prev := range old.Conditions {
			if prev.Type == cond.Type && prev.Status == cond.Status {
				cond.LastTransitionTime = prev.LastTransitionTime
			}
		}
		status.Conditions = append(status.Conditions, cond)
	}
	return status
}

func findStatus(statuses []corev1.ContainerStatus, name string) *corev1.ContainerStatus {
	for i := range statuses {
		if statuses[i].Name == name {
			return &statuses[i]
		}
	}
	return nil
}

// podIP is an address in 10.244.0.0/16 that stays the same for the pod.
func podIP(pod *corev1.Pod) string {
	h := fnv.New32a()
	_, _ = h.Write([]byte(pod.UID))
	sum := h.Sum32()
	return fmt.Sprintf("10.244.%d.%d", (sum>>8)%256, sum%254+1)
}

func containerID(pod *corev1.Pod, container string) string {
	h := fnv.New64a()
	_, _ = h.Write([]byte(string(pod.UID) + "/" + container))
	return fmt.Sprintf("containerd://%016x", h.Sum64())
}

func ignoreGone(err error) error {
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		// Gone or changed since read: the watch brings the new version.
		return nil
	}
	return err
}
