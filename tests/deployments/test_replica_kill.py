"""A replica killed mid-stream ends that stream with an error event; the next request is served.
Runs last in the session (file order): it takes one replica down."""

from __future__ import annotations

import json

import ray

from deployments.bootstrap import DEMO_MODEL_NAME


def test_kill_replica_mid_stream(served):
    body = {"model": DEMO_MODEL_NAME, "prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True,
            "temperature": 0}
    events = []
    with served.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            replica = r.headers["x-molora-replica"]
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        break
            actor = ray.get_actor(f"SERVE_REPLICA::molora#ModelReplica#{replica}", namespace="serve")
            ray.kill(actor, no_restart=True)
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] != "[DONE]"
        last = json.loads(events[-1])
        assert last["error"]["type"] == "server_error" and last["error"]["code"] == "unavailable"

        r = c.post("/v1/completions", json={"model": "code", "prompt": "x", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.headers["x-molora-replica"] != replica
