# Serving benchmark (issue 11): four `vllm serve`s side by side on one GPU; see benchmarks/gpu/README.md.

BENCH_SERVE_ARGS ?=

bench-serve: $(STAMP) ## GPU: vllm serve alone / ours / native offload / upstream LMCache on three workloads (writes .bench/serve.json, .png, logs)
	$(PY) benchmarks/bench_serve.py --out .bench/serve.json $(BENCH_SERVE_ARGS)

gpu-bundle: $(STAMP) ## download what the GPU machine lacks for bench-serve into .gpu/part1, part2... (each <= 56 MiB)
	$(PY) benchmarks/gpu/bundle.py --out .gpu

.PHONY: bench-serve gpu-bundle
