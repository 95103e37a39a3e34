"""Runs one model shard: owns the weights, the KV tensors, the request table and the sampler state.

It executes :class:`~sgl_ray.scheduler.plan.StepPlan` s and answers with :class:`StepOutput` s; everything it knows
about requests arrives in plans, so the same class serves the in-process engine and a Ray shard actor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from sgl_ray.attention import create_attention_backend
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.linear import store_weights_input_major
from sgl_ray.mem_cache.kv_pool import KVPool, ReqToTokenTable
from sgl_ray.models.registry import get_model_class
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.runner.memory import KVCapacity, plan_kv_capacity
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState
from sgl_ray.scheduler.plan import StepOutput, StepPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerInfo:
    """What the scheduler must know about the runner's memory (sizes are in tokens / request slots)."""

    num_slots: int  # KV slots including the reserved first page
    max_reqs: int
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class ModelRunner:
    """Example::

    >>> runner = ModelRunner(args, model_config, weights=iter_weights(source))  # doctest: +SKIP
    >>> out = runner.execute(plan)  # doctest: +SKIP
    """

    def __init__(
        self,
        args: EngineArgs,
        model_config: ModelConfig,
        weights,
        shard: ShardContext | None = None,
        capacity: KVCapacity | None = None,
        allocate: bool = True,
    ) -> None:
        """Load this shard's weights and (with ``allocate``) its KV pool — see :meth:`init_memory`."""
        self.args = args
        self.config = model_config
        self.device = args.torch_device()
        self.shard = shard or ShardContext()
        if args.num_threads and self.device.type == "cpu":
            torch.set_num_threads(args.num_threads)
        self.model = self._load_model(weights)
        self.attn_backend = create_attention_backend(args.attention_backend, self.device)
        self.sampler = Sampler()
        if allocate:
            self.init_memory(capacity)

    def init_memory(self, capacity: KVCapacity | None = None) -> RunnerInfo:
        """Allocate the KV pool, request table and sampling state. ``capacity`` must be the same on every shard
        of a group; by default it is planned from this device's memory (:meth:`plan_capacity`)."""
        capacity = capacity or self.plan_capacity()
        model_config = self.config
        first = self.model.model.layers[self.model.model.start]
        self.kv_pool = KVPool(
            capacity.num_slots,
            self.model.num_local_layers,
            first.self_attn.attn.num_kv_heads,
            model_config.head_dim,
            model_config.dtype,
            self.device,
        )
        self.req_table = ReqToTokenTable(capacity.max_reqs, model_config.context_length, self.device)
        self.sampling_state = SamplingState(capacity.max_reqs, model_config.vocab_size, self.device)
        self.info = RunnerInfo(
            num_slots=capacity.num_slots,
            max_reqs=capacity.max_reqs,
            context_length=model_config.context_length,
            vocab_size=model_config.vocab_size,
            eos_token_ids=model_config.eos_token_ids,
        )
        logger.info(
            "KV pool: %d slots (%.1f MiB), %d request slots",
            capacity.num_slots,
            self.kv_pool.nbytes / 2**20,
            capacity.max_reqs,
        )
        return self.info

    def plan_capacity(self) -> KVCapacity:
        """What this shard's memory allows (a group takes the minimum over its shards)."""
        fraction = self.model.num_local_layers / self.config.num_layers
        return plan_kv_capacity(self.args, self.config, self.device, self.shard.tp.world_size, fraction)

    def _load_model(self, weights) -> torch.nn.Module:
        cls = get_model_class(self.config.architecture)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.config.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.config, self.shard)
        finally:
            torch.set_default_dtype(prev)
        model.load_weights(weights)
        if self.device.type == "cpu":
            store_weights_input_major(model)
        return model.eval()

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step; ``compute_s`` of the answer is the time spent here."""
        t0 = time.perf_counter()
        out = self._execute(plan)
        out.compute_s = time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> StepOutput:
        state = self.sampling_state
        for idx in plan.freed_req_pool_idxs:
            state.clear_request(idx)
        for req in plan.new_requests:
            state.set_request(
                req.req_pool_idx, req.sampling, req.seed, req.eos_token_ids, req.prompt_ids, req.output_ids
            )
        dev = self.device
        if len(plan.table_req):
            self.req_table.write(
                _tensor(plan.table_req).to(dev),
                _tensor(plan.table_pos).to(dev),
                _tensor(plan.table_slot).to(dev),
            )
        if plan.batch_size == 0:
            return StepOutput(step_id=plan.step_id, next_token_ids=np.zeros(0, dtype=np.int64))
        batch, sample_rows, logprob_rows = self._build_batch(plan)
        shard = self.shard
        intermediate = None
        if not shard.is_first_stage:
            assert shard.pipe is not None
            shape = (plan.num_tokens, self.config.hidden_size)
            h, r = shard.pipe.recv([shape, shape], self.config.dtype, dev)
            intermediate = (h, r)
        hidden = self.model(batch, intermediate)  # [T, hidden], or (hidden, residual) before the last stage
        if not shard.is_last_stage:
            assert shard.pipe is not None
            shard.pipe.send(list(hidden))
            return StepOutput(step_id=plan.step_id, next_token_ids=np.zeros(0, dtype=np.int64))
        rows = _tensor(np.concatenate([sample_rows, logprob_rows])).to(dev)
        logits = self.model.compute_logits(hidden[rows])  # [S + L, vocab]
        return self._sample(plan, batch, logits[: len(sample_rows)], logits[len(sample_rows) :])

    def _build_batch(self, plan: StepPlan) -> tuple[ForwardBatch, np.ndarray, np.ndarray]:
        dev = self.device
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.concatenate(([0], np.cumsum(ext)[:-1])).astype(np.int64)
        positions = np.repeat(prefix - starts, ext) + np.arange(plan.num_tokens)  # [T]
        req_idxs = _tensor(plan.req_pool_idxs).to(dev)
        positions_t = _tensor(positions).to(dev)
        out_cache_loc = _tensor(plan.out_cache_loc).to(dev)
        self.req_table.write(
            torch.repeat_interleave(req_idxs, _tensor(ext).to(dev)), positions_t, out_cache_loc
        )
        counts = plan.sample_row_counts()
        ends = starts + ext
        # Each request's last ``counts[r]`` rows, in batch order; [S]
        sample_rows = np.repeat(ends, counts) - 1 - _rows_before_end(counts)
        want = plan.input_logprob_start >= 0
        logprob_rows = (
            np.concatenate(
                [
                    np.arange(s, s + n)
                    for s, n in zip(
                        (starts + plan.input_logprob_start)[want],
                        plan.input_logprob_counts[want],
                        strict=True,
                    )
                ]
            )
            if want.any()
            else np.zeros(0, dtype=np.int64)
        )
        batch = ForwardBatch(
            input_ids=_tensor(plan.input_ids).to(dev),
            positions=positions_t,
            out_cache_loc=out_cache_loc,
            req_pool_idxs=req_idxs,
            seq_lens=_tensor(prefix + ext).to(dev),
            extend_start_loc=_tensor(starts).to(dev),
            logits_indices=_tensor(sample_rows).to(dev),
            prefix_lens_cpu=prefix,
            extend_lens_cpu=ext,
            kv_pool=self.kv_pool,
            req_to_token=self.req_table.table,
            attn_backend=self.attn_backend,
        )
        self.attn_backend.init_forward_metadata(batch)
        return batch, sample_rows, logprob_rows.astype(np.int64)

    def _sample(
        self, plan: StepPlan, batch: ForwardBatch, logits: torch.Tensor, input_logits: torch.Tensor
    ) -> StepOutput:
        dev = self.device
        out = StepOutput(step_id=plan.step_id, next_token_ids=np.zeros(0, dtype=np.int64))
        if len(logits):
            counts = plan.sample_row_counts()
            row_req = np.repeat(np.arange(plan.batch_size), counts)  # [S] batch index of each sampled row
            slots_host = plan.req_pool_idxs[row_req]
            slots = _tensor(slots_host).to(dev)
            # Sequence position of each sampled token: one past its row ([S]).
            ends = plan.prefix_lens + plan.extend_lens
            positions = np.repeat(ends, counts) - _rows_before_end(counts)
            top_n = plan.top_logprobs_num[row_req]
            k = int(top_n.max()) if len(top_n) else -1
            mask = _tensor(plan.vocab_mask).to(dev) if plan.vocab_mask is not None else None
            res = self.sampler.sample(
                logits,
                slots,
                _tensor(positions).to(dev),
                self.sampling_state,
                top_logprobs_num=max(k, 0),
                return_logprobs=k >= 0,
                vocab_mask=mask,
            )
            if len(row_req) == plan.sample.sum():
                self.sampling_state.update(slots, res.next_token_ids)
            else:  # verification rows: only each request's last row is its new token
                last = _tensor(np.cumsum(counts)[counts > 0] - 1).to(dev)
                self.sampling_state.update(slots[last], res.next_token_ids[last])
            out.next_token_ids = res.next_token_ids.cpu().numpy()
            if k >= 0:
                out.logprobs = res.logprobs.cpu().numpy()
                if k > 0:
                    out.top_ids = res.top_logprob_ids.cpu().numpy()
                    out.top_vals = res.top_logprob_vals.cpu().numpy()
        if len(input_logits):
            logp = torch.log_softmax(input_logits, dim=-1)  # [L, vocab]
            targets = _tensor(plan.input_logprob_targets).to(dev)
            out.input_logprobs = logp.gather(1, targets[:, None]).squeeze(1).cpu().numpy()
            want = plan.input_logprob_start >= 0
            k = int(plan.top_logprobs_num[want].max())
            if k > 0:
                vals, ids = logp.topk(k, dim=-1)
                out.input_top_ids, out.input_top_vals = ids.cpu().numpy(), vals.cpu().numpy()
        return out


def _rows_before_end(counts: np.ndarray) -> np.ndarray:
    """``concat(arange(c)[::-1] for c in counts)``: how far each sampled row is from its request's last row."""
    counts = counts.astype(np.int64)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(counts, counts) - 1 - within


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` (copied when read-only, as arrays deserialised by Ray are)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())
