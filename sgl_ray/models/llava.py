"""LLaVA-NeXT (a CLIP tower on a Llama or Mistral decoder) and LLaVA-OneVision (a SigLIP tower on a Qwen2
decoder): the decoder is the project's own (:class:`LlamaForCausalLM`, :class:`Qwen2ForCausalLM`), with plain
positions; the image encoder is the tower (:mod:`.clip_siglip`) at ``vision_feature_layer``, the two-layer
projector into the decoder's hidden size, and the anyres packing of the crops' features with ``image_newline``
tokens (:mod:`.llava_anyres`).

The runner's :class:`~sgl_ray.multimodal.runner.MultimodalState` computes each image's embeddings once (cached by
image hash) and hands a step the rows that fall inside an image in ``batch.multimodal``; every other row embeds its
token, so decode steps run the decoder's usual path (and its CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.models.clip_siglip import VisionEncoder
from sgl_ray.models.llama import Intermediate, LlamaForCausalLM
from sgl_ray.models.llava_anyres import AnyresLayout
from sgl_ray.models.qwen import Qwen2ForCausalLM
from sgl_ray.models.qwen2_vl import forward_with_images
from sgl_ray.runner.forward_batch import ForwardBatch

_VISION_PARTS = ("vision_tower.", "multi_modal_projector.", "image_newline")


def hub_name(name: str) -> str:
    """A checkpoint tensor's name in this model: the hub's layout (``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.vision_model.*``) and transformers 5's (``model.language_model.*``,
    ``model.vision_tower.*``, ``lm_head.*``) both map to ``model.*``, ``lm_head.*`` and ``vision_tower.*``."""
    if name.startswith("model.") and name.removeprefix("model.").startswith(
        ("language_model.", *_VISION_PARTS)
    ):
        name = name.removeprefix("model.")
    if name.startswith("language_model."):
        name = name.removeprefix("language_model.")
        return name if name.startswith(("model.", "lm_head.")) else "model." + name
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


class MultiModalProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaImageEncoder(nn.Module):
    """Pixels of one image's crops -> its token embeddings, in the order of :mod:`.llava_anyres`."""

    def __init__(self, hf_config, text_hidden: int) -> None:
        super().__init__()
        layers = hf_config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        self.vision_tower = VisionEncoder(hf_config.vision_config, layers)
        shape = self.vision_tower.shape
        self.drop_class = hf_config.vision_feature_select_strategy == "default"  # drops the first position
        self.layout = AnyresLayout.from_config(hf_config)
        if shape.num_positions - int(self.drop_class) != self.layout.side**2:
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {hf_config.vision_feature_select_strategy!r} leaves "
                f"{shape.num_positions - int(self.drop_class)} features per crop, not the "
                f"{self.layout.side}x{self.layout.side} grid the image layout needs"
            )
        self.multi_modal_projector = MultiModalProjector(
            shape.dim * len(layers),
            text_hidden,
            getattr(hf_config, "projector_hidden_act", "gelu"),
            bool(getattr(hf_config, "multimodal_projector_bias", True)),
        )
        self.image_newline = nn.Parameter(torch.empty(text_hidden))

    def forward(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``pixels`` [crops, C, S, S] of an image of ``height x width`` pixels -> [tokens, text_hidden]."""
        features = self.vision_tower(pixels)  # [crops, positions, dim * layers]
        if self.drop_class:
            features = features[:, 1:]
        features = self.multi_modal_projector(features)  # [crops, side * side, hidden]
        newline = self.image_newline.to(features.dtype)
        base = features[0]
        if features.shape[0] == 1:  # the base crop alone
            return torch.cat([base, newline[None]])
        side, hidden = self.layout.side, features.shape[-1]
        rows, cols = self.layout.crop_grid(height, width)
        grid = self.layout.packed_grid(height, width)
        tiles = features[1:].view(rows, cols, side, side, hidden)
        tiled = tiles.permute(4, 0, 2, 1, 3).reshape(hidden, rows * side, cols * side)  # [hidden, H, W]
        tiled = tiled[:, grid.top : grid.top + grid.height, grid.left : grid.left + grid.width]
        if (grid.out_height, grid.out_width) != (grid.height, grid.width):  # OneVision's anyres_max_N
            size = [grid.out_height, grid.out_width]
            tiled = F.interpolate(tiled[None], size, mode="bilinear")[0]
        newlines = newline[:, None, None].expand(hidden, grid.out_height, 1)
        rows_out = torch.cat([tiled, newlines], dim=2)  # [hidden, out_h, out_w + 1]
        return torch.cat([base, rows_out.flatten(1).t()])


class LlavaMixin:
    """The image side of a LLaVA model over a decoder class that comes after it in the bases.

    Example::

        >>> llm = sgl_ray.Engine("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")  # doctest: +SKIP
        >>> llm.generate("<image>\\nDescribe it.", image_data=["cat.png"])  # doctest: +SKIP
    """

    decoder_types: tuple[str, ...] = ()  # the text config model types this class's decoder implements
    # the image encoder's tensors load as they are named (not through the decoder's fused q/k/v parameters)
    weight_remap = staticmethod(lambda name: (name, None) if name.startswith("image_encoder.") else None)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        if hf.model_type not in self.decoder_types:
            raise UnsupportedModelError(
                f"{type(self).__name__} with a {hf.model_type!r} language model is not supported "
                f"(have: {', '.join(self.decoder_types)})"
            )
        super().__init__(config, shard)  # the decoder's
        if not self.shard.is_first_stage or not self.shard.is_last_stage:
            raise ValueError("vision-language models run on a single pipeline stage")
        self.image_encoder = LlavaImageEncoder(hf, config.hidden_size)

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """One image's token embeddings [tokens, hidden] in the decoder's dtype; ``pixels`` [crops, C, S, S] and
        ``grids`` ``[(crops, height, width)]`` (the processor's ``ImageItem``)."""
        ((crops, height, width),) = grids
        assert pixels.shape[0] == crops, f"{pixels.shape[0]} crops of pixels for {crops}"
        dtype = self.config.dtype
        return self.image_encoder(pixels.to(dtype), height, width).to(dtype)

    def forward(
        self, batch: ForwardBatch, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        return forward_with_images(self.model, self.config.vocab_size, batch, intermediate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names of the hub's layout or transformers 5's (see :func:`hub_name`); the image encoder's
        tensors go to ``image_encoder.*`` under their checkpoint names."""

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = hub_name(name)
                yield ("image_encoder." + name if name.startswith(_VISION_PARTS) else name), tensor

        super().load_weights(renamed())  # type: ignore[misc]


class LlavaNextForConditionalGeneration(LlavaMixin, LlamaForCausalLM):
    decoder_types = ("llama", "mistral")


class LlavaOnevisionForConditionalGeneration(LlavaMixin, Qwen2ForCausalLM):
    decoder_types = ("qwen2",)
