"""Ray Serve deployments: config, ingress, model replicas, request routing, placement."""
