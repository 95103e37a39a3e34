"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): a SigLIP tower (:mod:`.clip_siglip`, every layer and
its final norm) whose patch grid is average-pooled to ``mm_tokens_per_image`` soft tokens, normed (Gemma's
``1 + weight`` RMSNorm) and projected to the decoder's width; the decoder is the project's
:class:`~sgl_ray.models.gemma.Gemma3ForCausalLM` (local and global layers, plain positions).

Unlike the other VL models, the soft tokens of one image attend to each other in both directions during prefill
(text stays causal; on local layers the window still bounds what a token sees behind it). The model says so with
:attr:`Gemma3ForConditionalGeneration.bidirectional_images`; the runner hands each step the image spans
(``MultimodalBatch.image_spans``) and the attention backend (torch, or Triton: the CUDA default) widens each image
token's mask to its image's end (``attention.base.image_key_ends``). An image's tokens must therefore be computed in
one step: prefill chunks end at image edges (``MultimodalInputs.chunk_end``), and start-up refuses FlashInfer,
whose masks are causal (:func:`sgl_ray.multimodal.config.check_engine_args`). Decode steps are causal and need
no spans (nothing follows their token).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.norm import GemmaRMSNorm
from sgl_ray.models.clip_siglip import VisionEncoder
from sgl_ray.models.gemma import Gemma3ForCausalLM
from sgl_ray.models.llama import Intermediate
from sgl_ray.models.llava import hub_name
from sgl_ray.models.qwen2_vl import forward_with_images
from sgl_ray.runner.forward_batch import ForwardBatch

_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


class Gemma3Projector(nn.Module):
    """The tower's ``side x side`` patch features -> ``tokens_per_side ** 2`` soft tokens in the decoder's width:
    average pooling over ``kernel x kernel`` patches, the soft-embedding norm, a bias-free projection."""

    def __init__(self, vision_dim: int, text_dim: int, eps: float, side: int, tokens: int) -> None:
        super().__init__()
        self.side = side
        tokens_per_side = int(tokens**0.5)
        if tokens_per_side**2 != tokens or side % tokens_per_side:
            raise UnsupportedModelError(
                f"mm_tokens_per_image {tokens} does not pool a {side}x{side} patch grid evenly"
            )
        self.kernel = side // tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision_dim, text_dim))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_dim, eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, side * side, dim] -> [N, tokens, text]
        n, _, dim = features.shape
        grid = features.transpose(1, 2).reshape(n, dim, self.side, self.side)  # [N, dim, side, side]
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # [N, tokens, dim]
        projected = self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight
        return projected.to(features.dtype)


class Gemma3ImageEncoder(nn.Module):
    """Pixels of images [N, C, S, S] -> their soft tokens [N, mm_tokens_per_image, text_hidden]."""

    def __init__(self, hf_config, text_hidden: int) -> None:
        super().__init__()
        self.vision_tower = VisionEncoder(hf_config.vision_config, [-1], post_layernorm=True)
        shape = self.vision_tower.shape
        if shape.class_token:
            raise UnsupportedModelError("Gemma 3 takes a SigLIP vision tower, not CLIP")
        self.multi_modal_projector = Gemma3Projector(
            shape.dim,
            text_hidden,
            shape.eps,
            shape.image_size // shape.patch_size,
            int(hf_config.mm_tokens_per_image),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixels))


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """Example::

    >>> llm = sgl_ray.Engine("google/gemma-3-4b-it")  # doctest: +SKIP
    >>> llm.generate("<start_of_image>Describe it.", image_data=["cat.png"])  # doctest: +SKIP
    """

    bidirectional_images = True  # one image's tokens attend to each other in prefill (multimodal.runner)
    # the image encoder's tensors load as they are named (not through the decoder's fused q/k/v parameters)
    weight_remap = staticmethod(lambda name: (name, None) if name.startswith("image_encoder.") else None)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        if hf.model_type != "gemma3_text":
            raise UnsupportedModelError(
                f"Gemma3ForConditionalGeneration with a {hf.model_type!r} language model is not supported "
                "(have: gemma3_text)"
            )
        super().__init__(config, shard)
        if not self.shard.is_first_stage or not self.shard.is_last_stage:
            raise ValueError("vision-language models run on a single pipeline stage")
        self.image_encoder = Gemma3ImageEncoder(hf, config.hidden_size)

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The images' soft tokens [images * mm_tokens_per_image, hidden] in the decoder's dtype; ``pixels``
        [images, C, S, S] (``grids``: one ``(1, S, S)`` per image)."""
        assert pixels.shape[0] == len(grids), f"{pixels.shape[0]} images of pixels for {len(grids)}"
        dtype = self.config.dtype
        return self.image_encoder(pixels.to(dtype)).flatten(0, 1).to(dtype)

    def forward(
        self, batch: ForwardBatch, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        mm = batch.multimodal
        if mm is not None and mm.image_spans is not None:
            # the runner attaches the step's images after it built the attention metadata: build it again,
            # now with the images' spans (steps whose rows reach into an image only)
            batch.attn_backend.init_forward_metadata(batch)
        # the image rows take the soft tokens as they are (transformers scales only the token embeddings)
        return forward_with_images(self.model, self.config.vocab_size, batch, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names of the hub's layout (``language_model.model.*``, ``vision_tower.vision_model.*``,
        ``multi_modal_projector.*``) or transformers 5's (``model.language_model.*``, ``model.vision_tower.*``,
        ``lm_head.*``); the image encoder's tensors go to ``image_encoder.*``."""

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = hub_name(name)
                yield ("image_encoder." + name if name.startswith(_VISION_PARTS) else name), tensor

        super().load_weights(renamed())
