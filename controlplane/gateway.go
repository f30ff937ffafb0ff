package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	gwapiv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// gatewayControllerName is what the stand-in Gateway API implementation signs its route
// statuses with.
const gatewayControllerName gwapiv1.GatewayController = "fineserve.dev/gateway-stand-in"

// enableGatewayAPI turns on KServe's Gateway API mode in the ingress entry of
// inferenceservice-config, as KServe's controller suite does for Standard mode
// (suite_test.go, getRawKubeTestConfigs) and as the README asks of a cluster.
func enableGatewayAPI(config *corev1.ConfigMap) error {
	ingress := map[string]any{}
	if err := json.Unmarshal([]byte(config.Data["ingress"]), &ingress); err != nil {
		return fmt.Errorf("inferenceservice-config, ingress: %w", err)
	}
	ingress["enableGatewayApi"] = true
	merged, err := json.Marshal(ingress)
	if err != nil {
		return err
	}
	config.Data["ingress"] = string(merged)
	return nil
}

// ingressGateway is the Gateway KServe attaches its HTTPRoutes to (the ingress entry's
// kserveIngressGateway, "namespace/name"), as manifests/kserve-gateway creates it on a cluster.
func ingressGateway(config *corev1.ConfigMap) (*gwapiv1.Gateway, error) {
	ingress := struct {
		KServeIngressGateway string `json:"kserveIngressGateway"`
	}{}
	if err := json.Unmarshal([]byte(config.Data["ingress"]), &ingress); err != nil {
		return nil, fmt.Errorf("inferenceservice-config, ingress: %w", err)
	}
	namespace, name, ok := strings.Cut(ingress.KServeIngressGateway, "/")
	if !ok {
		return nil, fmt.Errorf("inferenceservice-config, ingress: kserveIngressGateway %q is not namespace/name", ingress.KServeIngressGateway)
	}
	all := gwapiv1.NamespacesFromAll
	return &gwapiv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
		Spec: gwapiv1.GatewaySpec{
			GatewayClassName: "envoy",
			Listeners: []gwapiv1.Listener{{
				Name: "http", Port: 80, Protocol: gwapiv1.HTTPProtocolType,
				AllowedRoutes: &gwapiv1.AllowedRoutes{Namespaces: &gwapiv1.RouteNamespaces{From: &all}},
			}},
		},
	}, nil
}

// gateway plays a Gateway API implementation's part for HTTPRoutes: it reports each parent
// Gateway's verdict in the route's status, the field KServe waits on before it marks
// IngressReady (pkg/controller/v1beta1/inferenceservice/reconcilers/ingress/httproute_reconciler.go,
// isHTTPRouteReady). A route is Accepted by a Gateway that exists, and its refs are resolved when
// every backend Service exists. No traffic flows: there is no data plane.
type gateway struct {
	client.Client
}

func addGateway(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("gateway").For(&gwapiv1.HTTPRoute{}).
		Complete(&gateway{Client: mgr.GetClient()})
}

func (g *gateway) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	route := &gwapiv1.HTTPRoute{}
	if err := g.Get(ctx, req.NamespacedName, route); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	resolved, missing, err := g.backendsExist(ctx, route)
	if err != nil {
		return reconcile.Result{}, err
	}
	var parents []gwapiv1.RouteParentStatus
	for _, ref := range route.Spec.ParentRefs {
		namespace := route.Namespace
		if ref.Namespace != nil {
			namespace = string(*ref.Namespace)
		}
		accepted := metav1.Condition{Type: string(gwapiv1.RouteConditionAccepted), Status: metav1.ConditionTrue,
			Reason: string(gwapiv1.RouteReasonAccepted), Message: "Route is accepted"}
		err := g.Get(ctx, types.NamespacedName{Namespace: namespace, Name: string(ref.Name)}, &gwapiv1.Gateway{})
		if apierrors.IsNotFound(err) {
			accepted.Status, accepted.Reason = metav1.ConditionFalse, string(gwapiv1.RouteReasonNoMatchingParent)
			accepted.Message = fmt.Sprintf("Gateway %s/%s not found", namespace, ref.Name)
		} else if err != nil {
			return reconcile.Result{}, err
		}
		refs := metav1.Condition{Type: string(gwapiv1.RouteConditionResolvedRefs), Status: metav1.ConditionTrue,
			Reason: string(gwapiv1.RouteReasonResolvedRefs), Message: "Resolved all the Object references for the Route"}
		if !resolved {
			refs.Status, refs.Reason = metav1.ConditionFalse, string(gwapiv1.RouteReasonBackendNotFound)
			refs.Message = fmt.Sprintf("Service %s not found", missing)
		}
		status := gwapiv1.RouteParentStatus{ParentRef: ref, ControllerName: gatewayControllerName}
		for _, cond := range []metav1.Condition{accepted, refs} {
			cond.ObservedGeneration = route.Generation
			if old := findParent(route.Status.Parents, ref); old != nil {
				if prev := meta.FindStatusCondition(old.Conditions, cond.Type); prev != nil {
					cond.LastTransitionTime = prev.LastTransitionTime
				}
			}
			meta.SetStatusCondition(&status.Conditions, cond)
		}
		parents = append(parents, status)
	}
	if equality.Semantic.DeepEqual(parents, route.Status.Parents) {
		return reconcile.Result{}, nil
	}
	route.Status.Parents = parents
	return reconcile.Result{}, ignoreGone(g.Status().Update(ctx, route))
}

// backendsExist says whether every Service the route sends traffic to exists (else the first
// missing one).
func (g *gateway) backendsExist(ctx context.Context, route *gwapiv1.HTTPRoute) (bool, string, error) {
	for _, rule := range route.Spec.Rules {
		for _, backend := range rule.BackendRefs {
			if backend.Kind != nil && *backend.Kind != "Service" {
				continue
			}
			namespace := route.Namespace
			if backend.Namespace != nil {
				namespace = string(*backend.Namespace)
			}
			key := types.NamespacedName{Namespace: namespace, Name: string(backend.Name)}
			if err := g.Get(ctx, key, &corev1.Service{}); apierrors.IsNotFound(err) {
				return false, key.String(), nil
			} else if err != nil {
				return false, "", err
			}
		}
	}
	return true, "", nil
}

func findParent(parents []gwapiv1.RouteParentStatus, ref gwapiv1.ParentReference) *gwapiv1.RouteParentStatus {
	for i := range parents {
		if equality.Semantic.DeepEqual(parents[i].ParentRef, ref) {
			return &parents[i]
		}
	}
	return nil
}
