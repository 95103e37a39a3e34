"""DeepSeek's multi-token-prediction layer as the drafter (SGLang's ``EAGLE`` / ``NEXTN`` on a DeepSeek-V3 target
without ``speculative_draft_model_path``, or with the target's own path).

The MTP layer (``models.deepseek_mtp``) drafts exactly as an EAGLE-1 head does — its row at position ``p`` is
``(x_{p+1}, f_p)`` with ``f_p`` the target's final hidden state, it lags the target by one step, and later draft
steps reuse the same layer on its own output — so :class:`MtpDraft` is :class:`~sgl_ray.speculative.eagle.EagleDraft`
with another loader: the layer's weights come out of the target's checkpoint, and its KV pool is a one-layer MLA
latent pool at the target's slot indices.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sgl_ray.errors import InvalidRequestError
from sgl_ray.speculative.draft_runner import draft_runner_args
from sgl_ray.speculative.eagle import EagleDraft

if TYPE_CHECKING:
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.configs.model_config import ModelConfig
    from sgl_ray.speculative.tree import TreeShape

logger = logging.getLogger(__name__)

MTP_TARGETS = ("DeepseekV3ForCausalLM",)
"""Target architectures whose checkpoints carry MTP layers this drafter loads (Kimi-K2 is one of them)."""


class MtpDraft(EagleDraft):
    """Example::

    >>> draft = MtpDraft.load(args, target_model_config)  # doctest: +SKIP
    >>> draft.bind_target(target_model)  # the target's embedding / LM head where the layer has none  # doctest: +SKIP
    """

    @classmethod
    def load(  # type: ignore[override]
        cls, args: EngineArgs, target: ModelConfig, tree: TreeShape | None = None
    ) -> MtpDraft:
        """Load MTP layer 0 of the target's checkpoint (``args.model_path``). Raises
        :class:`InvalidRequestError` (``param="speculative_draft_model_path"``) for a target without one."""
        from sgl_ray.configs.model_config import ModelConfig
        from sgl_ray.model_loader import WeightStream, default_model_path, resolve_model
        from sgl_ray.models.deepseek_mtp import mtp_hf_config, num_mtp_layers
        from sgl_ray.runner.model_runner import ModelRunner

        hf = target.hf_config
        arch = target.architecture
        if arch not in MTP_TARGETS or num_mtp_layers(hf) < 1:
            why = (
                f"its config declares no multi-token-prediction layer (num_nextn_predict_layers="
                f"{num_mtp_layers(hf)})"
                if arch in MTP_TARGETS
                else f"{arch} has no multi-token-prediction layer (DeepSeek-V3 checkpoints do)"
            )
            raise InvalidRequestError(
                f"speculative_algorithm={args.speculative_algorithm!r} without speculative_draft_model_path "
                f"drafts with the target's multi-token-prediction layer, but {why}; set "
                "speculative_draft_model_path to an EAGLE head checkpoint",
                param="speculative_draft_model_path",
            )
        path = args.model_path or str(default_model_path())
        source = resolve_model(path, revision=args.revision, weights=args.load_format != "dummy")
        config = ModelConfig(mtp_hf_config(hf), target.dtype, target.context_length)
        runner = ModelRunner(draft_runner_args(args, path), config, WeightStream(source), allocate=False)
        logger.info(
            "multi-token-prediction layer %d of %s: %.1f MiB of weights",
            config.hf_config.mtp_layer_id,
            path,
            runner.weight_bytes / 2**20,
        )
        return cls(runner, target, tree)
