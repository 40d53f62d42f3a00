# e2e harness: a real control plane built from Go modules, end-to-end tests, operator benchmark.
# See docs/e2e.md.

E2E_BIN := .e2e/bin
E2E_PYTEST_ARGS ?=

e2e-tools: ## build the control plane, kubelet, kube-proxy, kubectl, etcd, kwok, helm, CoreDNS (cached by version)
	e2e/tools/build.sh

e2e-up: e2e-tools ## start the local control plane, fake GPU/hugepage nodes and the real node; writes .e2e/kubeconfig
	$(PYTHON) -m e2e.cluster up

e2e-down: ## stop the cluster started by e2e-up, real node included (host state restored)
	$(PYTHON) -m e2e.cluster down

e2e: $(STAMP) e2e-tools ## end-to-end tests (local control plane, or the cluster in KUBECONFIG)
	$(PY) -m pytest -q -p no:cacheprovider -o testpaths=e2e $(E2E_PYTEST_ARGS) e2e

.PHONY: e2e-tools e2e-up e2e-down e2e

bench-operator: $(STAMP) e2e-tools ## operator benchmark: 1000 LMCacheDeployments on 1000 fake nodes (writes .bench/operator.json)
	$(PY) -m e2e.bench_operator --out .bench/operator.json

.PHONY: bench-operator

e2e-images: ## build the real node's images (cached by content hash) and load them into a running real node
	$(PYTHON) -m e2e.node images

demo-k8s: $(STAMP) e2e-tools ## local cluster + real node: helm install, the Valkey example, a KV round trip between two pods
	$(PY) -m e2e.demo_k8s

.PHONY: e2e-images demo-k8s
