"""Micro-benchmark of the Triton attention backend on one GPU: decode bandwidth and extend throughput.

Decode: one layer call (store + split-KV decode) for B requests of S tokens on shuffled slots, timed as CUDA-graph
replays of L consecutive layers with distinct KV buffers (L chosen so that the KV read exceeds the L2 cache),
reported as µs per layer and effective bandwidth = K/V bytes read / time. Extend: prefill of new tokens on top of a
cached prefix, reported as causal attention TFLOP/s. The torch backend (gather + SDPA) is timed beside it where it
fits.

Example (on a CUDA machine)::

    python -m sgl_ray.attention.triton_bench --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable

import numpy as np
import torch
import triton.testing

from sgl_ray.attention.torch_backend import TorchAttentionBackend
from sgl_ray.attention.triton_backend import TritonAttentionBackend
from sgl_ray.layers.attention import RadixAttention
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch

L2_BYTES = 50 * 2**20


def graph_time_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """Median time of one replay of a CUDA graph holding ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(
    backend, prefix: np.ndarray, ext: np.ndarray, heads: int, kv_heads: int, head_dim: int, layers: int
):
    dev = torch.device("cuda")
    seq = prefix + ext
    total = int(seq.sum())
    pool = KVPool(total + 1, layers, kv_heads, head_dim, torch.bfloat16, dev)
    for buf in pool.k_buffers + pool.v_buffers:
        buf[1:].normal_()
    slots = 1 + torch.randperm(total, device=dev)
    table = torch.zeros((len(seq), int(seq.max())), dtype=torch.int64, device=dev)
    starts = np.concatenate(([0], np.cumsum(seq)[:-1]))
    for r in range(len(seq)):
        table[r, : seq[r]] = slots[starts[r] : starts[r] + seq[r]]
    out_loc = torch.cat([table[r, prefix[r] : seq[r]] for r in range(len(seq))])
    tok_starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
    num_tokens = int(ext.sum())
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=dev),
        positions=torch.from_numpy(np.repeat(prefix - tok_starts, ext) + np.arange(num_tokens)).to(dev),
        out_cache_loc=out_loc,
        req_pool_idxs=torch.arange(len(seq), device=dev),
        seq_lens=torch.from_numpy(seq).to(dev),
        extend_start_loc=torch.from_numpy(tok_starts).to(dev),
        logits_indices=torch.from_numpy(tok_starts + ext - 1).to(dev),
        prefix_lens_cpu=prefix,
        extend_lens_cpu=ext,
        kv_pool=pool,
        req_to_token=table,
        attn_backend=backend,
    )
    backend.init_forward_metadata(batch)
    qkv = torch.randn((num_tokens, (heads + 2 * kv_heads) * head_dim), device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    attn = [RadixAttention(heads, head_dim, head_dim**-0.5, kv_heads, i) for i in range(layers)]
    return batch, q, k, v, attn


def bench_decode(batch_size: int, seq_len: int, heads=32, kv_heads=8, head_dim=128) -> dict:
    kv_bytes = batch_size * seq_len * kv_heads * head_dim * 2 * 2  # K and V, bf16
    layers = min(32, max(1, math.ceil(4 * L2_BYTES / kv_bytes)))
    prefix, ext = np.full(batch_size, seq_len - 1), np.ones(batch_size, dtype=np.int64)
    backend = TritonAttentionBackend(torch.device("cuda"))
    batch, q, k, v, attn = build(backend, prefix, ext, heads, kv_heads, head_dim, layers)

    def all_layers() -> None:
        for layer in attn:
            backend.forward(q, k, v, layer, batch)

    graph_us = graph_time_ms(all_layers) / layers * 1e3
    eager_us = (
        triton.testing.do_bench(lambda: backend.forward(q, k, v, attn[0], batch), return_mode="median") * 1e3
    )
    row = dict(
        kind="decode",
        batch=batch_size,
        seq=seq_len,
        layers=layers,
        splits=backend._num_splits(batch.attn_metadata.decode, kv_heads),
        graph_us=graph_us,
        eager_us=eager_us,
        gbps=kv_bytes / graph_us / 1e3,
    )
    if batch_size * seq_len <= 32 * 4096:
        ref = TorchAttentionBackend(torch.device("cuda"))
        ref.init_forward_metadata(batch)
        row["torch_us"] = (
            triton.testing.do_bench(lambda: ref.forward(q, k, v, attn[0], batch), return_mode="median") * 1e3
        )
    return row


def bench_extend(
    batch_size: int, prefix_len: int, extend_len: int, heads=32, kv_heads=8, head_dim=128
) -> dict:
    prefix, ext = np.full(batch_size, prefix_len), np.full(batch_size, extend_len)
    backend = TritonAttentionBackend(torch.device("cuda"))
    batch, q, k, v, attn = build(backend, prefix, ext, heads, kv_heads, head_dim, 1)
    # Causal attention FLOPs: 2 matmuls x 2 flops per (query, visible key, head, dim).
    visible = batch_size * (extend_len * prefix_len + extend_len * (extend_len + 1) / 2)
    flops = 4 * visible * heads * head_dim
    us = triton.testing.do_bench(lambda: backend.forward(q, k, v, attn[0], batch), return_mode="median") * 1e3
    ref = TorchAttentionBackend(torch.device("cuda"))
    ref.init_forward_metadata(batch)
    torch_us = (
        triton.testing.do_bench(lambda: ref.forward(q, k, v, attn[0], batch), return_mode="median") * 1e3
    )
    return dict(
        kind="extend",
        batch=batch_size,
        prefix=prefix_len,
        extend=extend_len,
        us=us,
        tflops=flops / us / 1e6,
        torch_us=torch_us,
        torch_tflops=flops / torch_us / 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="append one JSON line per measurement")
    args = parser.parse_args()
    rows = []
    for batch_size in (1, 32, 128):
        for seq_len in (1024, 4096, 16384):
            rows.append(bench_decode(batch_size, seq_len))
            torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    for shape in ((1, 0, 4096), (8, 0, 1024), (4, 4096, 512)):
        rows.append(bench_extend(*shape))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(
        f"\n{torch.cuda.get_device_name()}  Llama-8B-like layer: 32 q heads, 8 kv heads, head_dim 128, bf16"
    )
    print("decode   batch    seq  splits  graph µs/layer  eager µs  KV GB/s  torch µs")
    for r in rows:
        if r["kind"] == "decode":
            torch_us = f"{r['torch_us']:9.1f}" if "torch_us" in r else "        -"
            print(
                f"       {r['batch']:6d} {r['seq']:6d} {r['splits']:7d} {r['graph_us']:15.1f} "
                f"{r['eager_us']:9.1f} {r['gbps']:8.0f} {torch_us}"
            )
    print("extend   batch prefix new    µs    TFLOP/s   torch µs  torch TFLOP/s")
    for r in rows:
        if r["kind"] == "extend":
            print(
                f"       {r['batch']:6d} {r['prefix']:6d} {r['extend']:4d} {r['us']:8.1f} {r['tflops']:8.1f} "
                f"{r['torch_us']:10.1f} {r['torch_tflops']:10.1f}"
            )


if __name__ == "__main__":
    main()
