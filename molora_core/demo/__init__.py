"""Demo assets (model, tokenizer, adapters, router) made locally with no download."""

from molora_core.demo.assets import ADAPTERS, ROUTER, demo_assets_present, ensure_demo_assets, make_demo_assets

__all__ = ["ADAPTERS", "ROUTER", "demo_assets_present", "ensure_demo_assets", "make_demo_assets"]
