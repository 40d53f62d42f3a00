# Remote (Valkey/Redis) tier benchmark; needs redis-server on PATH (Debian: redis-server).

bench-remote: $(STAMP) ## remote tier put/get vs the plain valkey client on one redis-server (writes .bench/remote.json)
	$(PY) benchmarks/bench_remote.py --out .bench/remote.json

.PHONY: bench-remote
