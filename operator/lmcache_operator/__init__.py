"""kopf operator that turns an `LMCacheDeployment` into vLLM + LMCache serving resources."""
