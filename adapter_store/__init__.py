"""Adapters as artifacts: PEFT validation, manifests, object storage, the Redis registry,
placement and the registry's HTTP routes. Never imports molora_core or kernels."""
