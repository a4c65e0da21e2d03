"""The clusters' passive health settings (outlier_detection in envoy/envoy.yaml) do what the
comments there say: a dead replica among several is ejected after 3 consecutive gateway
failures, while a model's only replica is never ejected by passive signals."""

from __future__ import annotations

import time

from conftest import (
    PHI,
    QWEN,
    assert_openai_error,
    cluster,
    completion_body,
    start_mock,
)


def test_dead_replica_is_ejected_single_replica_is_not(envoy_factory, session_dir):
    qwen = start_mock(session_dir, QWEN, "qwen-a")
    phi_a = start_mock(session_dir, PHI, "phi-a")
    phi_b = start_mock(session_dir, PHI, "phi-b")
    try:

        def two_phi_replicas(cfg):
            cluster(cfg, "phi-vllm")["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": phi_b.port}}}}
            )

        env = envoy_factory({"qwen-vllm": qwen.port, "phi-vllm": phi_a.port}, mutate=two_phi_replicas, name="outlier")
        client = env.client()
        seen = {client.post("/v1/completions", json=completion_body(PHI)).headers["x-mock-backend"] for _ in range(8)}
        assert seen == {"phi-a", "phi-b"}, "both replicas should take traffic"

        # phi-a dies. Requests that land on it fail (503 JSON); after 3 in a row it is ejected.
        phi_a.kill()
        for _ in range(40):
            r = client.post("/v1/completions", json=completion_body(PHI))
            if r.status_code != 200:
                assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
            if env.stat("cluster.phi-vllm.outlier_detection.ejections_enforced_total") >= 1:
                break
        else:
            raise AssertionError("phi-a was not ejected after 40 requests")
        assert env.stat("cluster.phi-vllm.outlier_detection.ejections_enforced_consecutive_gateway_failure") == 1
        for _ in range(10):
            r = client.post("/v1/completions", json=completion_body(PHI))
            assert r.status_code == 200 and r.headers["x-mock-backend"] == "phi-b", (r.status_code, r.text)

        # Qwen has one replica: when it dies, requests fail, but it is not ejected
        # (max_ejection_percent 50): passive signals never take out a model's last replica.
        qwen.kill()
        for _ in range(6):
            r = client.post("/v1/completions", json=completion_body(QWEN))
            assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
        time.sleep(0.1)
        assert env.stat("cluster.qwen-vllm.outlier_detection.ejections_enforced_total") == 0
        assert env.stat("cluster.qwen-vllm.outlier_detection.ejections_overflow") >= 1
    finally:
        for m in (qwen, phi_a, phi_b):
            m.stop()
