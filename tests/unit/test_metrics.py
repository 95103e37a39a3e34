"""The Serve app's Prometheus exposition (``deployments.metrics``) from engine stats."""

from __future__ import annotations


def test_metrics_export_speculation_only_for_speculating_models():
    from sgl_ray.deployments.metrics import Metrics

    spec = {"spec_algorithm": "NGRAM", "spec_verify_steps": 12, "spec_proposed_drafts": 30,
            "spec_accepted_drafts": 18, "spec_accept_length": 2.5}  # fmt: skip
    text = Metrics().render([("a", spec), ("b", {"spec_algorithm": None})])
    assert 'sgl_ray_spec_verify_steps_total{model="a"} 12' in text
    assert 'sgl_ray_spec_accepted_drafts_total{model="a"} 18' in text
    assert 'sgl_ray_spec_accept_length{model="a"} 2.5' in text
    assert 'model="b"} ' not in "\n".join(
        line for line in text.splitlines() if line.startswith("sgl_ray_spec")
    )
    assert "sgl_ray_spec_" not in Metrics().render({})  # no speculation: no series
