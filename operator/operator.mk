# The operator (operator/lmcache_operator): run it against the cluster in KUBECONFIG.
# See docs/operator.md.

OPERATOR_ARGS ?= --all-namespaces --health-port 8080 --metrics-port 9090
KUBECTL ?= kubectl
OPERATOR_CRD := charts/lmcache-operator/crds/lmcachedeployments.serving.lmcache-kube.io.yaml

operator-run: $(STAMP) ## run the operator locally against the cluster in KUBECONFIG (flags: OPERATOR_ARGS=...)
	@test -n "$$KUBECONFIG" || test -f "$$HOME/.kube/config" || { echo "set KUBECONFIG" >&2; exit 2; }
	$(VENV)/bin/lmcache-operator $(OPERATOR_ARGS)

operator-crd: ## install or update the LMCacheDeployment CRD in the cluster in KUBECONFIG
	$(KUBECTL) apply --server-side --field-manager=lmcache-operator -f $(OPERATOR_CRD)

operator-unit: $(STAMP) ## the operator's unit tests only
	$(PY) -m pytest -q tests/operator

.PHONY: operator-run operator-crd operator-unit
