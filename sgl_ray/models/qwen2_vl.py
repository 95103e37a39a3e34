"""Qwen2-VL and Qwen2.5-VL: the Qwen2 decoder with multimodal rotary (M-RoPE) under a vision tower
(:mod:`.qwen2_vl_vision`, whose flags tell the two families apart).

The image tokens' embeddings come from the tower (the runner's :class:`~sgl_ray.multimodal.runner.MultimodalState`
computes and caches them per image, and hands each step's rows in ``batch.multimodal``); every other row embeds its
token. M-RoPE rotates the head's frequency bands ``mrope_section`` with the temporal, height and width position
of the token; a text token has all three equal, which is plain rotary, so text-only batches take the decoder's
usual path (and its fused CUDA kernels) unchanged, and so do steps whose rows all lie past their prompts: a
generated token rotates as plain rotary at ``position + mrope_delta`` (``batch.rope_offset``), which keeps decode
steps of image requests in CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.rotary import RotaryEmbedding
from sgl_ray.models.llama import DecoderFlags, Intermediate, LlamaForCausalLM
from sgl_ray.models.qwen2_vl_vision import Qwen2VisionTransformer
from sgl_ray.runner.forward_batch import ForwardBatch


def forward_with_images(
    decoder: torch.nn.Module, vocab_size: int, batch: ForwardBatch, intermediate: Intermediate | None
) -> torch.Tensor | Intermediate:
    """The decoder on a step whose rows inside images take the images' embeddings (``batch.multimodal``) in place
    of their token embeddings; a step without such rows runs as text."""
    mm = batch.multimodal
    if mm is None or mm.image_rows is None:
        return decoder(batch, intermediate)
    embed = decoder.embed_tokens
    assert embed is not None
    ids = torch.where(batch.input_ids < vocab_size, batch.input_ids, 0)  # image key ids -> any real id
    hidden = embed(ids)  # [T, hidden]
    hidden = hidden.index_copy(0, mm.image_rows, mm.image_embeds.to(hidden.dtype))
    return decoder(batch, (hidden, None))


class MRotaryEmbedding(RotaryEmbedding):
    """Rotary whose band ``i`` of ``mrope_section`` (in frequency pairs) turns with position component ``i % 3`` of
    the token; the batch's ``multimodal.mrope_positions`` [3, T] give them. Without it all three are the position
    plus ``batch.rope_offset`` (when set: each request's ``mrope_delta``), which is plain rotary at that position."""

    def __init__(
        self, head_dim: int, rope_parameters: dict, max_position: int, mrope_section: list[int]
    ) -> None:
        super().__init__(head_dim, rope_parameters, max_position)
        half = [torch.full((s,), i % 3, dtype=torch.int64) for i, s in enumerate(mrope_section)]
        component = torch.cat(half + half)  # [rotary_dim]: which position component rotates each dimension
        if component.numel() != self.rotary_dim:
            raise ValueError(
                f"mrope_section {mrope_section} does not cover half of the rotary dim {self.rotary_dim}"
            )
        self.register_buffer("component", component, persistent=False)

    def cos_sin_for(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        mm = batch.multimodal
        if mm is None or mm.mrope_positions is None:
            if batch.rope_offset is None:
                return super().cos_sin_for(batch, dtype)
            # rows past their prompts: three equal components, plain rotary at position + mrope_delta
            return self.cos_sin(batch.positions + batch.rope_offset, dtype)
        pos = mm.mrope_positions  # [3, T]
        pick = self.component.view(1, 1, -1).expand(1, pos.shape[1], -1)  # [1, T, rotary_dim]
        cos = self.cos_cache[pos].gather(0, pick).squeeze(0).unsqueeze(1)  # [T, 1, rotary_dim]
        sin = self.sin_cache[pos].gather(0, pick).squeeze(0).unsqueeze(1)
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """Example::

    >>> llm = sgl_ray.Engine("Qwen/Qwen2-VL-2B-Instruct")  # doctest: +SKIP
    >>> llm.generate("<|vision_start|><|image_pad|><|vision_end|>Describe it.", image_data=["cat.png"])  # doctest: +SKIP
    """

    vision_tower = Qwen2VisionTransformer
    # decode steps of image requests read ``batch.rope_offset`` (CUDA graphs keep a buffer for it)
    uses_rope_offset = True
    # the tower's tensors load as they are named (not through the decoder's fused q/k/v and gate/up parameters)
    weight_remap = staticmethod(lambda name: (name, None) if name.startswith("visual.") else None)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        super().__init__(config, shard, DecoderFlags(qkv_bias=True, o_bias=False))
        hf = config.hf_config
        if not self.shard.is_first_stage or not self.shard.is_last_stage:
            raise ValueError("vision-language models run on a single pipeline stage")
        self.visual = self.vision_tower(hf.vision_config)
        params = dict(config.rope_parameters)
        section = params.pop("mrope_section", None) or [16, 24, 24]  # transformers' default
        if params.get("rope_type") == "mrope":  # older configs name M-RoPE as a rope type
            params["rope_type"] = "default"
        rotary = MRotaryEmbedding(config.head_dim, params, config.context_length, list(section))
        self.model.rotaries = torch.nn.ModuleList([rotary])  # every layer rotates alike

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The images' token embeddings [sum of tokens, hidden] in the decoder's dtype."""
        return self.visual(pixels, grids).to(self.config.dtype)

    def forward(
        self, batch: ForwardBatch, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        return forward_with_images(self.model, self.config.vocab_size, batch, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names of either layout: the hub's (``visual.*``, ``model.*``) or transformers 5's
        (``model.visual.*``, ``model.language_model.*``)."""

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.replace("model.language_model.", "model.", 1)
                yield name.replace("model.visual.", "visual.", 1), tensor

        super().load_weights(renamed())
