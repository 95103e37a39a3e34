"""Ray Serve LLM's configuration shape: ``build_openai_app({"llm_configs": [...]})`` deployed the way a Ray user's
YAML is (``serve deploy``: the declarative API), two tiny models in one app routed by ``model``, one of them with
Ray's ``lora_config`` (adapters loaded on first use) and a priority scheduler; a scaling change in the config's
``deployments:`` section keeps the running replicas."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx2 as httpx  # the official openai client's HTTP client (httpx's API)
import pytest
import yaml

from .conftest import API_KEY

LLAMA, QWEN = "tiny-llama", "tiny/qwen3.0"  # the second id has the characters Ray's deployment names replace
AUTH = {"Authorization": f"Bearer {API_KEY}"}

CONFIG = """
applications:
  - name: multi
    route_prefix: /multi
    import_path: sgl_ray.deployments:build_openai_app
    args:
      api_key: {api_key}
      llm_configs:
        - model_loading_config: {{model_id: {llama}, model_source: {llama_path}}}
          engine_kwargs: {{max_model_len: 1024, max_total_tokens: 4096, max_num_seqs: 1, schedule_policy: priority}}
          lora_config: {{dynamic_lora_loading_path: {lora_root}, max_num_adapters_per_replica: 2}}
          deployment_config:
            autoscaling_config: {{min_replicas: 1, max_replicas: 1, target_ongoing_requests: 2}}
        - model_loading_config: {{model_id: {qwen}, model_source: {qwen_path}}}
          engine_kwargs: {{max_total_tokens: 4096, enable_prefix_caching: true, trust_remote_code: true,
                          speculative_algorithm: NGRAM}}
          deployment_config: {{num_replicas: 1}}
    deployments:
      - name: LLMServer:tiny--qwen3_0
        max_ongoing_requests: {qwen_ongoing}
"""


def _deploy(paths: dict[str, str], qwen_ongoing: int) -> None:
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    text = CONFIG.format(api_key=API_KEY, llama=LLAMA, qwen=QWEN, qwen_ongoing=qwen_ongoing, **paths)
    client = serve.context._get_global_client()  # what `serve deploy config.yaml` does, without the dashboard
    client.deploy_apps(ServeDeploySchema.model_validate(yaml.safe_load(text)))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = serve.status().applications.get("multi")
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(status.message)
        time.sleep(1)
    raise AssertionError("the llm_configs app did not start")


@pytest.fixture(scope="module")
def multi(serve_url, tiny_llama_path, tiny_qwen3_path, lora_adapters):
    from ray import serve

    lora_root = str(Path(next(iter(lora_adapters.values()))).parent)
    paths = {"llama_path": tiny_llama_path, "qwen_path": tiny_qwen3_path, "lora_root": lora_root}
    _deploy(paths, qwen_ongoing=64)
    yield f"{serve_url}/multi", paths
    serve.delete("multi", _blocking=False)


@pytest.mark.serve
@pytest.mark.slow
def test_two_models_routed_by_model(multi, hf_reference, peft_reference):
    import openai

    url, _ = multi
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {LLAMA, QWEN}
    assert cards[LLAMA].max_model_len == 1024 and cards[QWEN].max_model_len == 8192
    assert client.models.retrieve(QWEN).id == QWEN
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
        ids = http.post("/tokenize", json={"text": "The capital of France is"}).json()["tokens"]
        for model, reference in ((LLAMA, hf_reference("llama")), (QWEN, hf_reference("qwen3"))):
            out = http.post(
                "/generate", json={"model": model, "input_ids": ids, "sampling_params": greedy}
            ).json()
            assert out["output_ids"] == reference(ids, 6), model  # each model's own greedy tokens
            r = client.completions.create(
                model=model, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
            )
            assert r.model == model and r.choices[0].text == out["text"]
            chat = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
            )
            assert chat.model == model and chat.usage.completion_tokens <= 3
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny-other", prompt="Hi", max_tokens=1)
        # Ray's lora_config: '<model id>:<adapter>' loads the adapter from dynamic_lora_loading_path/<adapter>
        r = client.completions.create(
            model=f"{LLAMA}:a1", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        native = {"model": LLAMA, "lora_path": "a1", "input_ids": ids, "sampling_params": greedy}
        lora = http.post("/generate", json=native).json()
        assert lora["output_ids"] == peft_reference("a1", ids, 6) and r.choices[0].text == lora["text"]
        assert "a1" in {m.id for m in client.models.list().data}  # listed under its own name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=f"{LLAMA}:no-such-adapter", prompt="Hi", max_tokens=1)
        metrics = http.get("/metrics").text
        assert f'sgl_ray_num_running_requests{{model="{QWEN}"}}' in metrics
        # the NGRAM model's verify steps (every decode step of a speculating request is one); none for the other
        steps = [line for line in metrics.splitlines() if line.startswith("sgl_ray_spec_verify_steps_total")]
        assert len(steps) == 1 and steps[0].startswith(f'sgl_ray_spec_verify_steps_total{{model="{QWEN}"}} ')
        assert int(steps[0].split()[-1]) > 0 and "# TYPE sgl_ray_spec_accept_length gauge" in metrics


@pytest.mark.serve
@pytest.mark.slow
def test_priority_orders_the_waiting_requests(multi):
    """One running request at a time (max_num_seqs: 1) under schedule_policy priority: of two waiting requests,
    the higher priority runs first, whichever came first."""
    import openai

    url, _ = multi
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    done: list[str] = []

    async def ask(name: str, tokens: int, **extra) -> None:
        body = {"ignore_eos": True, **extra}
        await client.completions.create(model=LLAMA, prompt="Hi", max_tokens=tokens, extra_body=body)
        done.append(name)

    async def waiting(http: httpx.AsyncClient, count: int) -> bool:
        for _ in range(200):
            info = (await http.get("/get_server_info")).json()
            if (
                next(m for m in info["models"] if m["served_model_name"] == LLAMA)["internal_states"][0][
                    "num_waiting"
                ]
                == count
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as http:
            blocker = asyncio.create_task(ask("blocker", 1000, rid="blocker"))
            await asyncio.sleep(0.3)
            low = asyncio.create_task(ask("low", 2, priority=0))
            assert await waiting(http, 1)
            high = asyncio.create_task(ask("high", 2, priority=10))
            assert await waiting(http, 2) and not blocker.done()
            await http.post("/abort_request", json={"rid": "blocker"})
            await asyncio.gather(blocker, low, high)

    asyncio.run(main())
    assert done.index("high") < done.index("low")


@pytest.mark.serve
@pytest.mark.slow
def test_a_scaling_change_keeps_the_replicas(multi):
    url, paths = multi

    def replicas() -> dict[str, str]:
        info = httpx.get(f"{url}/get_server_info", headers=AUTH, timeout=60).json()
        return {m["served_model_name"]: m["replica_id"] for m in info["models"]}

    def ongoing() -> int:
        info, _ = serve.context._get_global_client().get_deployment_info("LLMServer:tiny--qwen3_0", "multi")
        return info.deployment_config.max_ongoing_requests

    from ray import serve

    before = replicas()
    assert all(before.values()) and ongoing() == 64  # the config's deployments: section applies
    _deploy(paths, qwen_ongoing=32)  # only that section changed: a lightweight update
    for _ in range(100):
        if ongoing() == 32:
            break
        time.sleep(0.1)
    assert ongoing() == 32
    time.sleep(2)  # a replica being replaced would be gone or new by now
    assert replicas() == before


def test_ray_shaped_config_errors(tiny_llama_path):
    from sgl_ray.deployments import build_openai_app
    from sgl_ray.errors import InvalidRequestError

    model = {"model_loading_config": {"model_id": "m", "model_source": tiny_llama_path}}
    both = {"num_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}
    cases = [
        ({"model_path": tiny_llama_path, **both}, "num_replicas"),
        ({"llm_configs": [{**model, "deployment_config": both}]}, "num_replicas"),
        ({"llm_configs": [{**model, "engine_kwargs": {"swap_space": 4}}]}, "engine_kwargs"),
        ({"llm_configs": [{**model, "placement_group_config": {}}]}, "placement_group_config"),
        ({"llm_configs": [{**model, "deployment_config": {"replicas": 2}}]}, "deployment_config"),
        ({"llm_configs": [model, model]}, "llm_configs"),
        ({"llm_configs": [{"engine_kwargs": {}}]}, "llm_configs"),
        ({"llm_configs": [model], "served_model_name": "x"}, None),
        ({"llm_configs": []}, "llm_configs"),
    ]
    for args, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            build_openai_app(args)
        assert info.value.param == param, args
    auto = {"llm_configs": [{**model, "deployment_config": {**both, "num_replicas": "auto"}}]}
    assert type(build_openai_app(auto)).__name__ == "Application"  # Serve's "auto" goes with autoscaling
