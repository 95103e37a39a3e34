"""The roofline floor of a shared-prefix workload counts the prefix once (prefill, KV reads per decode step, the
KV pool's fit), and a fraction above 1.0 is never reported without a warning. CPU only, no engine."""

from __future__ import annotations

import json
import math

import pytest

from sgl_ray.bench.fastpath import Row, format_roofline, to_record
from sgl_ray.bench.roofline import (
    DeviceRates,
    ModelCost,
    decode_step_s,
    format_fraction,
    max_batch_for,
    prefill_s,
    shared_prefix_floor_s,
    workload_floor_s,
)

# Llama-3.1-8B-shaped costs (bf16) on H100-like rates.
COST = ModelCost(matmul_params=7.5e9, weight_bytes=15e9, kv_bytes_per_token=131072, attn_flops_per_ctx=524288)
RATES = DeviceRates(copy_bytes_per_s=3.0e12, matmul_flops_per_s=7.9e14)
NUM, PREFIX, SUFFIX, OUT, MAX_RUNNING = 256, 2048, 64, 128, 256


def test_the_pool_fits_the_prefix_once():
    # Room for the prefix once and 256 suffixes + outputs: all 256 run at once. Held per request, 22 would.
    slots = PREFIX + NUM * (SUFFIX + OUT)
    assert max_batch_for(slots, MAX_RUNNING, PREFIX + SUFFIX, OUT, shared=PREFIX) == 256
    assert max_batch_for(slots, MAX_RUNNING, PREFIX + SUFFIX, OUT) == slots // (PREFIX + SUFFIX + OUT) == 22
    assert max_batch_for(slots - 1, MAX_RUNNING, PREFIX + SUFFIX, OUT, shared=PREFIX) == 255


def test_a_decode_step_reads_the_prefix_kv_once():
    ctx = PREFIX + SUFFIX + OUT / 2
    kv = COST.kv_bytes_per_token
    step = decode_step_s(COST, RATES, 256, ctx, shared=PREFIX)
    read_once = (COST.weight_bytes + (PREFIX + 256 * (ctx - PREFIX)) * kv) / RATES.copy_bytes_per_s
    flops = 256 * (2 * COST.matmul_params + COST.attn_flops_per_ctx * ctx) / RATES.matmul_flops_per_s
    assert step == pytest.approx(max(read_once, flops))
    assert step == pytest.approx(read_once)  # bandwidth-bound: 19.6 GB against 4.1 TFLOP
    per_request = decode_step_s(COST, RATES, 256, ctx)
    assert per_request == pytest.approx((COST.weight_bytes + 256 * ctx * kv) / RATES.copy_bytes_per_s)
    assert per_request > 4 * step  # the prefix's 268 MB read 256 times was most of the step
    # Attention FLOPs still count the prefix for every query: at batch 1 nothing is shared, so nothing changes.
    assert decode_step_s(COST, RATES, 1, ctx, shared=PREFIX) == decode_step_s(COST, RATES, 1, ctx)


def test_shared_prefix_floor_by_hand():
    """The whole workload on a pool that fits the 256 requests only with the prefix counted once."""
    slots = PREFIX + NUM * (SUFFIX + OUT)
    floor = shared_prefix_floor_s(COST, RATES, NUM, PREFIX, SUFFIX, OUT, slots, MAX_RUNNING)
    bw, rate, kv = RATES.copy_bytes_per_s, RATES.matmul_flops_per_s, COST.kv_bytes_per_token
    p, attn = COST.matmul_params, COST.attn_flops_per_ctx
    prefix = max((2 * p * PREFIX + attn * PREFIX**2 / 2) / rate, COST.weight_bytes / bw)
    full = PREFIX + SUFFIX
    suffixes = max(NUM * (2 * p * SUFFIX + attn * (full**2 - PREFIX**2) / 2) / rate, COST.weight_bytes / bw)
    ctx = full + OUT / 2
    step = max(
        (COST.weight_bytes + (PREFIX + NUM * (ctx - PREFIX)) * kv) / bw, NUM * (2 * p + attn * ctx) / rate
    )
    assert floor == pytest.approx(prefix + suffixes + OUT * step)
    # The old floor (every request's prefix held and read on its own, 22 at a time) is 8x higher: beatable.
    old = workload_floor_s(COST, RATES, NUM, full, OUT, max_batch_for(slots, MAX_RUNNING, full, OUT), PREFIX)
    old += prefill_s(COST, RATES, 1, PREFIX)
    assert old > 8 * floor
    # Never above the same workload without sharing, and equal to it for an empty prefix.
    unshared = workload_floor_s(COST, RATES, NUM, full, OUT, 256, PREFIX) + prefill_s(COST, RATES, 1, PREFIX)
    assert floor < unshared
    no_prefix = shared_prefix_floor_s(COST, RATES, NUM, 0, SUFFIX, OUT, slots, MAX_RUNNING)
    batch = max_batch_for(slots, MAX_RUNNING, SUFFIX, OUT)
    assert no_prefix == pytest.approx(workload_floor_s(COST, RATES, NUM, SUFFIX, OUT, batch))
    args = (COST, RATES, NUM, PREFIX, SUFFIX, OUT, slots, MAX_RUNNING)
    assert shared_prefix_floor_s(*args, phased=True) >= floor  # the phased floor is never below the plain one


def test_a_fraction_above_one_is_never_printed_bare():
    assert format_fraction(0.93) == "0.93" and format_fraction(1.0) == "1.00"
    assert format_fraction(None) == "-" and format_fraction(math.nan) == "-"
    assert format_fraction(1.23) == "1.23 (WARNING: above the floor)"
    fine = Row("offline 8x32/8", "sgl_ray", 64, 1.0, 64.0, floor_tok_s=100.0, phased_floor_tok_s=90.0)
    beaten = Row(
        "shared-prefix 4x(64+8)/4", "sgl_ray", 32, 1.0, 123.0, floor_tok_s=100.0, phased_floor_tok_s=150.0
    )
    facts = {"copy_GBps": 3000.0, "matmul_TFLOPs": 790.0, "weight_GB": 15.0, "kv_token_capacity": 4096}
    table = format_roofline(RATES, {**facts, "cuda_graphs": True, "overlap": True}, [fine, beaten])
    assert "| offline 8x32/8 | sgl_ray | 64.0 | 100 | 0.64 | 0.71 |" in table
    assert "| 1.23 (WARNING: above the floor) | 0.82 |" in table
    (warning,) = [line for line in table.splitlines() if line.startswith("- WARNING")]
    assert (
        "shared-prefix 4x(64+8)/4 / sgl_ray" in warning
        and "floor's model of this workload is wrong" in warning
    )
    assert json.loads(to_record(facts, beaten))["above_floor"] is True
    assert json.loads(to_record(facts, fine))["above_floor"] is False
