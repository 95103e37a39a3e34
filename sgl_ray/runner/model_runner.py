"""Runs one model shard: owns the weights, the KV tensors, the request table and the sampler state.

It executes :class:`~sgl_ray.scheduler.plan.StepPlan` s and answers with :class:`StepOutput` s; everything it knows
about requests arrives in plans, so the same class serves the in-process engine and a Ray shard actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from sgl_ray.attention import create_attention_backend
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.fused_linear import fold_norms_if_supported
from sgl_ray.layers.linear import store_weights_input_major
from sgl_ray.layers.moe.base import create_moe_backend
from sgl_ray.layers.quantization import checkpoint_quant_method, create_quant_method, weight_nbytes
from sgl_ray.lora.weights import LoRAWeights
from sgl_ray.mem_cache.kv_pool import KVPool, MLAKVPool, ReqToTokenTable
from sgl_ray.mem_cache.kv_scales import CheckpointKVScales
from sgl_ray.model_loader.quantized import quantized_weights
from sgl_ray.model_loader.weights import WeightStream, fill_random_weights
from sgl_ray.models.registry import get_model_class
from sgl_ray.multimodal.runner import MultimodalState
from sgl_ray.runner.ahead import resolve_ahead
from sgl_ray.runner.cuda_graph import CudaGraphRunner
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.runner.memory import KVCapacity, kv_cache_dtype, plan_kv_capacity
from sgl_ray.runner.step_sampling import rows_before_end, sample_step
from sgl_ray.runner.trace import StepTrace, TracedStep
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import Admission, SamplingState
from sgl_ray.scheduler.plan import FUTURE_TOKEN, StepDrafts, StepOutput, StepPlan
from sgl_ray.speculative.worker import SpecWorker
from sgl_ray.transfer import to_device

logger = logging.getLogger(__name__)


_NO_TOKENS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class PendingStep:
    """A launched step: its results are being copied into ``host`` tensors; ``event`` marks the copies done."""

    step_id: int
    host: dict[str, torch.Tensor]
    event: torch.cuda.Event | None
    t0: float
    awaits_mask: bool = (
        False  # launched with ``mask_deferred``: give it to :meth:`ModelRunner.sample_deferred`
    )
    drafts: StepDrafts | None = None  # launched with ``drafts_deferred``: what the masks are built from


@dataclass(frozen=True)
class RunnerInfo:
    """What the scheduler must know about the runner's memory (sizes are in tokens / request slots)."""

    num_slots: int  # KV slots including the reserved first page
    max_reqs: int
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    weight_bytes: int = 0  # this shard's weights as held (quantized ones at their encoded size)
    kv_window: int | None = None  # every layer's window, when all have one: KV out of it may be let go of
    # Hybrid pools (mem_cache.hybrid_swa): the windowed layers' slots (0: none); ``kv_window`` is then their window
    swa_num_slots: int = 0


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
        self.shard = dataclasses.replace(shard or ShardContext(), moe_a2a_backend=args.moe_a2a_backend)
        if args.num_threads and self.device.type == "cpu":
            torch.set_num_threads(args.num_threads)
        # Speculative decoding (None when off): the draft model, if any, and the verification of drafts
        self.spec = SpecWorker.create(args, model_config)
        self.model = self._load_model(weights)
        if self.spec is not None:
            self.spec.bind_target(self.model)  # an EAGLE head shares weights and reads hidden states
        self.weight_bytes = weight_nbytes(self.model)
        logger.info(
            "weights: %.1f MiB as held%s",
            self.weight_bytes / 2**20,
            f" (quantization={self.quantization})" if self.quantization else "",
        )
        self.lora = (
            LoRAWeights(
                self.model, args.max_loras_per_batch, args.max_lora_rank or 0, self.device, args.lora_backend
            )
            if args.lora_enabled
            else None
        )
        self.attn_backend = create_attention_backend(
            args.attention_backend,
            self.device,
            args.triton_attention_num_kv_splits,
            mla=model_config.kv_latent_dim > 0,
        )
        # MoE models only: the experts' kernels (see sgl_ray.layers.moe)
        self.moe_backend = (
            create_moe_backend(args.moe_runner_backend, self.device)
            if hasattr(self.model, "moe_blocks")
            else None
        )
        self.sampler = Sampler()
        # Vision-language models: each request's images and the image embedding cache
        self.multimodal = (
            MultimodalState(self.model, self.device) if hasattr(self.model, "embed_images") else None
        )
        self.cuda_graphs: CudaGraphRunner | None = None
        self.full_to_swa: torch.Tensor | None = None  # hybrid KV pools only
        # Set to a list to record (batch size, start event, end event) of every CUDA step (see gpu_idle_fraction).
        self.step_trace: StepTrace | None = None
        self._trace_start: torch.cuda.Event | None = None
        self._awaiting_mask: tuple[StepPlan, torch.Tensor, torch.Tensor] | None = (
            None  # (plan, logits, input)
        )
        # The last step launched, if it verified drafts: (its plan, its emitted counts on the host, their event)
        self._last_verify: tuple[StepPlan, torch.Tensor, torch.cuda.Event | None] | None = None
        if allocate:
            self.init_memory(capacity)

    def init_memory(self, capacity: KVCapacity | None = None) -> RunnerInfo:
        """Allocate the KV pool, request table and sampling state. ``capacity`` must be the same on every shard
        of a group; by default it is planned from this device's memory (:meth:`plan_capacity`)."""
        capacity = capacity or self.plan_capacity()
        model_config = self.config
        first = self.model.model.layers[self.model.model.start]
        kv_dtype = kv_cache_dtype(self.args, model_config)  # the model's dtype, or FP8 (not MLA)
        if model_config.kv_latent_dim:  # MLA: one compressed latent per token and layer
            self.kv_pool = MLAKVPool(
                capacity.num_slots,
                self.model.num_local_layers,
                model_config.kv_latent_dim,
                model_config.dtype,
                self.device,
            )
        else:
            self.attn_backend.check_kv_cache_dtype(kv_dtype)
            swa_layers = self._hybrid_swa_layers() if capacity.swa_num_slots else None
            self.kv_pool = KVPool(
                capacity.num_slots,
                self.model.num_local_layers,
                first.self_attn.attn.num_kv_heads,
                model_config.head_dim,
                kv_dtype,
                self.device,
                self.kv_scales.for_layers(range(self.model.model.start, self.model.model.end)),
                swa_layers,
                capacity.swa_num_slots if swa_layers is not None else 0,
            )
            if swa_layers is not None:  # full slot -> the windowed layers' slot (0: none), see _apply_swa_map
                self.full_to_swa = torch.zeros(capacity.num_slots, dtype=torch.int64, device=self.device)
        self.req_table = ReqToTokenTable(capacity.max_reqs, model_config.context_length, self.device)
        if self.spec is not None:
            self.spec.init_memory(capacity, self.req_table)  # a draft model's KV pool, at the same slots
        self.sampling_state = SamplingState(capacity.max_reqs, model_config.vocab_size, self.device)
        self.last_tokens = torch.zeros(capacity.max_reqs, dtype=torch.int64, device=self.device)
        self.info = RunnerInfo(
            num_slots=capacity.num_slots,
            max_reqs=capacity.max_reqs,
            context_length=model_config.context_length,
            vocab_size=model_config.vocab_size,
            eos_token_ids=model_config.eos_token_ids,
            weight_bytes=self.weight_bytes,
            kv_window=self._kv_window(model_config),
        )
        if self.full_to_swa is not None:
            windows = [w for w in self._layer_windows() if w is not None]
            self.info = dataclasses.replace(
                self.info, kv_window=max(windows), swa_num_slots=capacity.swa_num_slots
            )
        logger.info(
            "KV pool: %d slots%s (%.1f MiB), %d request slots",
            capacity.num_slots,
            f" + {capacity.swa_num_slots} for the windowed layers" if self.full_to_swa is not None else "",
            self.kv_pool.nbytes / 2**20,
            capacity.max_reqs,
        )
        if self._use_cuda_graphs():
            # verify steps of chains replay them too, a row per token: up to num_draft_tokens rows a request
            spec = self.spec
            rows = spec.config.num_draft_tokens if spec is not None and not spec.config.is_tree else 1
            self.cuda_graphs = CudaGraphRunner(
                self.model,
                self.attn_backend,
                self.kv_pool,
                self.req_table.table,
                self.last_tokens,
                min(self.args.cuda_graph_max_bs, capacity.max_reqs * rows),
                model_config.context_length,
                self.lora,
                self.moe_backend,
                self.full_to_swa,
            )
        return self.info

    def _kv_window(self, model_config: ModelConfig) -> int | None:
        """The window the scheduler may free KV behind: off with a draft model (its layers read the same slots
        with their own reach) and with ``disable_hybrid_swa_memory``."""
        if self.args.disable_hybrid_swa_memory or self.args.speculative_algorithm is not None:
            return None
        return model_config.kv_window

    def _layer_windows(self) -> list[int | None]:
        """Each local layer's attention window (None: full attention)."""
        layers = self.model.model.layers[self.model.model.start : self.model.model.end]
        return [getattr(layer.self_attn.attn, "sliding_window", None) for layer in layers]

    def _hybrid_swa_layers(self) -> list[bool] | None:
        """Which local layers keep their KV in the windowed layers' own pool (``mem_cache.hybrid_swa``), or None
        when the pools are not split: every layer or none has a window, ``disable_hybrid_swa_memory``, multi-head
        latent attention, pipeline stages, or an attention backend that reads one slot space only (FlashInfer). CUDA
        decode graphs keep working with split pools (the Triton kernels read the windowed layers' slots through the
        map, see ``CudaGraphRunner``). A draft model keeps its own single pool (``SpecWorker.init_memory``)."""
        from sgl_ray.attention.torch_backend import TorchAttentionBackend
        from sgl_ray.attention.triton_backend import TritonAttentionBackend

        if (
            self.args.disable_hybrid_swa_memory
            or self.config.kv_latent_dim
            or self.shard.pp_size > 1
            or not isinstance(self.attn_backend, (TorchAttentionBackend, TritonAttentionBackend))
        ):
            return None
        windowed = [w is not None for w in self._layer_windows()]
        if all(windowed) or not any(windowed):
            return None
        return windowed

    def _use_cuda_graphs(self) -> bool:
        """Graphs for decode on CUDA, unless disabled; pipeline stages exchange activations outside them, and an
        EAGLE head reads every step's hidden states. Hybrid KV pools replay too: the captured step translates its
        slots through the runner's map (``CudaGraphRunner``)."""
        return (
            self.device.type == "cuda"
            and not self.args.disable_cuda_graph
            and self.shard.pp_size == 1
            and self.attn_backend.supports_cuda_graph
            and (self.moe_backend is None or self.moe_backend.supports_cuda_graph)
            and (self.spec is None or not self.spec.needs_hidden)
        )

    def plan_capacity(self) -> KVCapacity:
        """What this shard's memory allows (a group takes the minimum over its shards)."""
        fraction = self.model.num_local_layers / self.config.num_layers
        swa_layers = self._hybrid_swa_layers()
        swa_fraction = sum(swa_layers) / len(swa_layers) if swa_layers else 0.0
        capacity = plan_kv_capacity(
            self.args, self.config, self.device, self.shard.tp.world_size, fraction, swa_fraction
        )
        if self.spec is not None:
            per_token = self.config.kv_bytes_per_token(
                self.shard.tp.world_size, kv_cache_dtype(self.args, self.config)
            )
            if capacity.swa_num_slots:  # hybrid pools: the windowed layers' share is held for fewer tokens
                held = 1.0 - swa_fraction + swa_fraction * capacity.swa_num_slots / capacity.num_slots
                per_token = max(1, int(per_token * held))
            capacity = self.spec.scale_capacity(
                capacity, per_token, self.args.max_total_tokens is not None, self.args.page_size
            )
        return capacity

    def _load_model(self, weights) -> torch.nn.Module:
        weight_format = weights.source.format if isinstance(weights, WeightStream) else "tensors"
        self.kv_scales = CheckpointKVScales()  # an FP8 KV cache's per-layer scales, from the checkpoint
        if self.args.load_format == "dummy":
            weight_format = "dummy"
        hf_config = self.config.hf_config
        self.quantization = self.args.effective_quantization(
            self.device, weight_format, checkpoint_quant_method(hf_config)
        )
        quant = create_quant_method(self.quantization, hf_config, self.device)  # AWQ, GPTQ, FP8 (or None)
        cls = get_model_class(self.config.architecture)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.config.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.config, self.shard)
        finally:
            torch.set_default_dtype(prev)
        if self.args.load_format == "dummy":
            fill_random_weights(model, seed=self.args.random_seed or 0)
        else:
            if isinstance(weights, WeightStream):
                wanted = getattr(model, "wants_weight", None)
                if wanted is not None:
                    weights = weights.only(wanted)  # e.g. other expert-parallel ranks' experts are never read
                weights = weights.quantized(self.quantization == "gguf")
            if quant is not None:
                # a quantized layer's parts -> one weight (float for the layers the model wants so)
                weights = quantized_weights(weights, quant, getattr(model, "float_layers", ()))
            model.load_weights(self.kv_scales.collect(weights))
        if quant is not None:
            quant.process_loaded(model)  # online FP8
        if self.device.type == "cpu":
            store_weights_input_major(model)
        fold_norms_if_supported(model, self.device, self.config.dtype, self.shard, self.args.lora_enabled)
        return model.eval()

    def expert_load(self) -> dict[str, list[int]] | None:
        """MoE models: tokens routed to each expert so far, per sparse layer of this shard's stage
        (``{str(layer): [count per global expert]}``); None for a dense model."""
        load = getattr(self.model, "expert_load", None)
        if load is None:
            return None
        return {str(layer): counts.tolist() for layer, counts in load().items()} or None

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step; ``compute_s`` of the answer is the time spent here."""
        return self.collect(self.launch(plan))

    def launch(self, plan: StepPlan) -> PendingStep:
        """Enqueue a step's device work and return without waiting for it (overlap scheduling); :meth:`collect`
        returns its output. Steps run in launch order, and a step may read the token its request slot's previous
        step sampled (``plan.FUTURE_TOKEN`` inputs). A plan with ``mask_deferred`` runs its forward pass and waits
        for :meth:`sample_deferred`; with ``drafts_deferred`` too, the answer carries the step's drafts, which its
        masks are built from."""
        t0 = time.perf_counter()
        assert self._awaiting_mask is None, "the previous step still waits for its masks (sample_deferred)"
        self._trace_start = None
        if len(plan.ahead_drafts):
            plan = self._resolve_ahead(plan)
        with torch.inference_mode():
            results = self._launch(plan)
        if self._awaiting_mask is not None:
            drafts = None
            if plan.drafts_deferred:
                assert self.spec is not None, "drafts_deferred on a runner without speculative decoding"
                drafts = self.spec.pending_drafts(plan.step_id)
            return PendingStep(plan.step_id, {}, None, t0, awaits_mask=True, drafts=drafts)
        return self._copy_out(plan, results, t0)

    def sample_deferred(self, pending: PendingStep, vocab_mask: np.ndarray | None) -> PendingStep:
        """Sample a step launched with ``plan.mask_deferred`` under its masks, known now that the steps before
        it have been processed; returns what :meth:`collect` takes. Its forward pass ran meanwhile."""
        assert pending.awaits_mask and self._awaiting_mask is not None
        plan, logits, input_logits = self._awaiting_mask
        self._awaiting_mask = None
        plan.vocab_mask = vocab_mask
        with torch.inference_mode():
            results = self._sample(plan, logits, input_logits)
        return self._copy_out(plan, results, pending.t0)

    def _copy_out(self, plan: StepPlan, results: dict[str, torch.Tensor], t0: float) -> PendingStep:
        host = {name: t.to("cpu", non_blocking=True) for name, t in results.items()}
        event = None
        if self.device.type == "cuda":
            trace = self.step_trace is not None
            event = torch.cuda.Event(enable_timing=trace)
            event.record()
            if trace and self._trace_start is not None:
                self.step_trace.append(TracedStep(plan.batch_size, plan.num_tokens, self._trace_start, event))
        emitted = host.get("spec_emitted")
        self._last_verify = (plan, emitted, event) if emitted is not None and len(plan.draft_lens) else None
        return PendingStep(plan.step_id, host, event, t0)

    def _resolve_ahead(self, plan: StepPlan) -> StepPlan:
        """A plan built while the previous step ran (overlap scheduling with speculation): see ``runner.ahead``.
        Reads that step's emitted counts, so it waits for the step to finish (the scheduler's work for this plan
        overlapped it)."""
        last = self._last_verify
        assert last is not None, "a plan runs ahead of a verify step this runner did not run last"
        previous, emitted, event = last
        if event is not None:
            event.synchronize()
        return resolve_ahead(plan, previous, emitted.numpy(), self.info.max_reqs)

    def collect(self, pending: PendingStep) -> StepOutput:
        assert not pending.awaits_mask, "sample_deferred() first"
        if pending.event is not None:
            pending.event.synchronize()
        arrays = {name: t.numpy() for name, t in pending.host.items()}
        out = StepOutput(
            step_id=pending.step_id, next_token_ids=arrays.pop("next_token_ids", _NO_TOKENS), **arrays
        )
        out.compute_s = time.perf_counter() - pending.t0
        return out

    def _launch(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        state = self.sampling_state
        state.clear_requests(plan.freed_req_pool_idxs)
        state.set_requests(
            [
                Admission(r.req_pool_idx, r.sampling, r.seed, r.eos_token_ids, r.prompt_ids, r.output_ids)
                for r in plan.new_requests
            ]
        )
        if self.multimodal is not None:
            self.multimodal.admit(plan)
        if plan.lora_loads:
            assert self.lora is not None, "LoRA is not enabled on this runner"
            for load in plan.lora_loads:
                self.lora.load(load.slot, load.path)
        dev = self.device
        if len(plan.table_req):
            self.req_table.write(
                self._h2d(plan.table_req),
                self._h2d(plan.table_pos),
                self._h2d(plan.table_slot),
            )
        if len(plan.swa_map_pages):
            self._apply_swa_map(plan.swa_map_pages, plan.swa_map_values)
        if plan.batch_size == 0:
            if self.spec is not None:
                self.spec.admit_only(plan)
            return {}
        if self.step_trace is not None and self.device.type == "cuda":  # the device's work starts here
            self._trace_start = torch.cuda.Event(enable_timing=True)
            self._trace_start.record()
        input_ids = None
        if self.spec is not None:
            if self.spec.draft is not None:  # its passes read the positions this plan writes
                self._write_table(plan)
            # planned ahead: FUTURE_TOKEN inputs are the slot's previous token, which the drafter reads too
            input_ids = self.spec.before_forward(plan, self._input_ids(plan, None, plan.extend_lens))
        graphs = self.cuda_graphs
        slots = plan.lora_slots if self.lora is not None else None
        # Image requests: a step reaching into a prompt takes a MultimodalBatch (images, M-RoPE positions) and runs
        # eagerly; one past the prompts needs only M-RoPE's per-request rotary offsets, which graphs take too.
        mm = self.multimodal
        with_images = mm is not None and mm.involves(plan)
        rope_offsets = mm.rope_offsets(plan) if mm is not None and not with_images else None  # [B] or None
        rows = self._graph_rows(plan) if graphs is not None and not with_images else None
        if rows is not None:  # decode steps, and verify steps of chains: one decode row per token
            assert graphs is not None
            ext = plan.extend_lens
            row_slots = np.repeat(slots, ext) if slots is not None else None
            if graphs.can_run(plan.num_tokens, row_slots):
                logits = graphs.replay(
                    input_ids if input_ids is not None else plan.input_ids,
                    rows,
                    plan.out_cache_loc,
                    np.repeat(plan.req_pool_idxs, ext),
                    row_slots,
                    np.repeat(rope_offsets, ext) if rope_offsets is not None else None,
                )
                return self._sample_or_defer(plan, logits, logits[:0])
        batch, sample_rows, logprob_rows = self._build_batch(plan, input_ids)
        if with_images:
            assert mm is not None
            batch.multimodal = mm.step(plan)
        elif rope_offsets is not None:
            batch.rope_offset = self._h2d(np.repeat(rope_offsets, plan.extend_lens))  # [T]
        shard = self.shard
        intermediate = None
        if not shard.is_first_stage:
            assert shard.pipe is not None
            shape = (plan.num_tokens, self.config.hidden_size)
            h, r = shard.pipe.recv([shape, shape], self.config.dtype, dev)
            intermediate = (h, r)
        if self.lora is not None:
            self.lora.begin(plan.lora_slots, plan.extend_lens)
        try:  # [T, hidden], or (hidden, residual) before the last stage
            hidden = self.model(batch, intermediate)
        finally:
            if self.lora is not None:
                self.lora.end()
        if not shard.is_last_stage:
            assert shard.pipe is not None
            shard.pipe.send(list(hidden))
            return {}
        if self.spec is not None:
            self.spec.after_forward(batch, hidden)
        rows = self._h2d(np.concatenate([sample_rows, logprob_rows]))
        logits = self.model.compute_logits(hidden[rows])  # [S + L, vocab]
        return self._sample_or_defer(plan, logits[: len(sample_rows)], logits[len(sample_rows) :])

    def _graph_rows(self, plan: StepPlan) -> np.ndarray | None:
        """The positions of a plan that can replay the decode graphs (``StepPlan.decode_rows``), None if it can't:
        a verify step of draft trees needs its tree mask."""
        spec = self.spec
        if spec is not None and spec.config.is_tree and len(plan.draft_lens) and plan.draft_lens.any():
            return None
        return plan.decode_rows()

    def _apply_swa_map(self, pages: np.ndarray, values: np.ndarray) -> None:
        """Hybrid pools: full page ``pages[i]`` now maps to the windowed layers' page ``values[i]`` (0: none, its
        slots then map to the reserved slot 0), token by token."""
        assert self.full_to_swa is not None, "SWA map writes for a runner without hybrid pools"
        p = self.args.page_size
        offsets = np.arange(p, dtype=np.int64)
        slots = (pages[:, None] * p + offsets).reshape(-1)
        swa = np.where(values[:, None] > 0, values[:, None] * p + offsets, 0).reshape(-1)
        self.full_to_swa[self._h2d(slots)] = self._h2d(swa)

    def _write_table(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map every token of the plan to its KV slot in the request table; returns (request slots [B],
        positions [T], KV slots [T]) on the device."""
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.cumsum(ext) - ext
        positions = np.repeat(prefix - starts, ext) + np.arange(plan.num_tokens)  # [T]
        req_idxs = self._h2d(plan.req_pool_idxs)
        positions_t = self._h2d(positions)
        out_cache_loc = self._h2d(plan.out_cache_loc)
        self.req_table.write(
            torch.repeat_interleave(req_idxs, self._h2d(ext), output_size=plan.num_tokens),
            positions_t,
            out_cache_loc,
        )
        return req_idxs, positions_t, out_cache_loc

    def _build_batch(
        self, plan: StepPlan, input_ids: torch.Tensor | None = None
    ) -> tuple[ForwardBatch, np.ndarray, np.ndarray]:
        """The target's batch; ``input_ids`` replaces the plan's tokens (drafts written in by a draft model)."""
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.cumsum(ext) - ext
        req_idxs, positions_t, out_cache_loc = self._write_table(plan)
        counts = plan.sample_row_counts()
        ends = starts + ext
        # Each request's last ``counts[r]`` rows, in batch order; [S]
        sample_rows = np.repeat(ends, counts) - 1 - rows_before_end(counts)
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
            input_ids=input_ids if input_ids is not None else self._input_ids(plan, req_idxs, ext),
            positions=positions_t,
            out_cache_loc=out_cache_loc,
            req_pool_idxs=req_idxs,
            seq_lens=self._h2d(prefix + ext),
            extend_start_loc=self._h2d(starts),
            logits_indices=self._h2d(sample_rows),
            prefix_lens_cpu=prefix,
            extend_lens_cpu=ext,
            kv_pool=self.kv_pool,
            req_to_token=self.req_table.table,
            attn_backend=self.attn_backend,
            moe_backend=self.moe_backend,
            full_to_swa=self.full_to_swa,
        )
        batch.translate_swa()  # hybrid pools: the new tokens' slots in the windowed layers' pool
        if self.spec is not None:  # draft trees: their rows' positions and attention mask
            self.spec.prepare_batch(plan, batch)
        self.attn_backend.init_forward_metadata(batch)
        return batch, sample_rows, logprob_rows.astype(np.int64)

    def _sample_or_defer(
        self, plan: StepPlan, logits: torch.Tensor, input_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if plan.mask_deferred:  # logits from a graph stay valid: nothing replays before sample_deferred
            self._awaiting_mask = (plan, logits, input_logits)
            return {}
        return self._sample(plan, logits, input_logits)

    def _h2d(self, array: np.ndarray) -> torch.Tensor:
        return to_device(array, self.device)

    def _input_ids(self, plan: StepPlan, req_idxs: torch.Tensor | None, ext: np.ndarray) -> torch.Tensor:
        """The plan's token ids, with ``FUTURE_TOKEN`` entries replaced by their slot's last sampled token
        (``req_idxs``: the plan's request slots on the device, where the caller has them)."""
        ids = self._h2d(plan.input_ids)
        if (plan.input_ids == FUTURE_TOKEN).any():
            if req_idxs is None:
                req_idxs = self._h2d(plan.req_pool_idxs)
            per_token = torch.repeat_interleave(req_idxs, self._h2d(ext), output_size=plan.num_tokens)
            ids = torch.where(ids == FUTURE_TOKEN, self.last_tokens[per_token], ids)
        return ids

    def _sample(
        self, plan: StepPlan, logits: torch.Tensor, input_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return sample_step(
            plan, logits, input_logits, self.sampler, self.sampling_state, self.last_tokens, self.spec
        )
