"""The model side of MoLoRA Serve: routing plans, the hot-set, MoLoRA layers, the decoder runtime
and the engine. Never imports Ray or Redis."""
