# Helm chart: lint, golden renders, values schema, README values table, deploy/ sync, release.
# The chart (charts/lmcache-operator/Chart.yaml) is the one source of the version; see
# docs/install.md. helm and kubectl come from the e2e harness (`make e2e-tools`).

CHARTCTL := $(PY) charts/tools/chartctl.py

# In `make test` a missing helm is an error, not a skip.
chart-check: $(STAMP) e2e-tools ## chart: helm lint --strict, golden renders, schema, README table, deploy/ sync
	$(CHARTCTL) lint
	$(CHARTCTL) versions
	CHART_REQUIRE_TOOLS=1 $(PY) -m pytest -q -p no:cacheprovider tests/chart

chart-golden-update: $(STAMP) ## chart: rewrite tests/chart/golden/*.yaml from the current templates
	$(CHARTCTL) golden --update

chart-readme: $(STAMP) ## chart: regenerate the values table in charts/lmcache-operator/README.md
	$(CHARTCTL) readme --update

deploy-update: $(STAMP) ## chart: regenerate the kustomize manifests under deploy/ from the chart
	$(CHARTCTL) deploy --update

crd-engine-schema: $(STAMP) ## chart: regenerate the CRD's lmcache.extraConfig schema from the engine's config keys
	$(CHARTCTL) engine-schema --update

chart-generate: crd-engine-schema chart-golden-update chart-readme deploy-update ## chart: every derived file at once

release: chart-check ## package the chart into dist/ with its .sha256 (version from Chart.yaml)
	$(CHARTCTL) release --dest dist

test: chart-check

.PHONY: chart-check chart-golden-update chart-readme deploy-update crd-engine-schema chart-generate release

chart-lint: $(STAMP) ## chart tooling: ruff + mypy on charts/tools and tests/chart
	$(VENV)/bin/ruff check charts/tools tests/chart
	$(VENV)/bin/ruff format --check charts/tools tests/chart
	$(VENV)/bin/mypy charts/tools

lint: chart-lint

.PHONY: chart-lint
