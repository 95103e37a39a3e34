"""Gemma GGUF files (llama.cpp's ``gemma2`` and ``gemma3``; text weights only): their names, norms and metadata.

* Names: a Gemma layer has four norms where Llama's has two, and llama.cpp calls the one before the MLP
  ``ffn_norm`` as it does Llama's ``post_attention_layernorm``::

      attn_norm            input_layernorm
      post_attention_norm  post_attention_layernorm      (on attention's output)
      ffn_norm             pre_feedforward_layernorm
      post_ffw_norm        post_feedforward_layernorm    (on the MLP's output)

  q/k rows keep HF's order (llama.cpp permutes them for ``llama`` only).
* Norms: HF's Gemma checkpoints store each RMSNorm's scale as ``weight`` with the norm multiplying by
  ``1 + weight``; llama.cpp's converter adds the 1 (:data:`NORM_OFFSET`). The loader takes it off again, in float32
  like transformers' GGUF loader, so both give the norms the same ``1 + (w' - 1)`` in the end.
* Metadata the files do not carry, or that transformers' GGUF conversion drops (:func:`gemma_config_fields`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sgl_ray.model_loader.gguf_header import GGUFFile

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GEMMA_ARCHS = frozenset({"gemma2", "gemma3"})
GEMMA_BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
"""Block tensors whose HF names differ from Llama's (``blk.N.<key>`` → ``model.layers.N.<value>``)."""
NORM_OFFSET = 1.0
"""What llama.cpp's converter added to every Gemma RMSNorm weight (``*norm.weight``)."""
END_OF_TURN = "<end_of_turn>"
_GEMMA3_27B_LAYERS = 62


def gemma_config_fields(arch: str, reader: GGUFFile, config: PretrainedConfig) -> dict[str, Any]:
    """HF config fields of a Gemma file beyond those transformers' GGUF conversion reads (empty for other
    architectures; each a no-op where the conversion already has the right value):

    * ``<end_of_turn>`` among the EOS ids, where the vocabulary has it: Gemma's chat turns end with it (HF's
      checkpoints list it in their generation config, which a GGUF file does not carry);
    * Gemma 2's score and logit soft caps from the file (``<arch>.attn_logit_softcapping``,
      ``<arch>.final_logit_softcapping``) rather than the config class's defaults;
    * Gemma 3's ``query_pre_attn_scalar``, which the file does not carry: the head dimension, but
      ``hidden_size / num_heads`` for the 27B model (62 layers), as llama.cpp derives it;
    * Gemma 3's rope scaling of the global layers (``<arch>.rope.scaling.type``/``.factor``, linear in the 4B-27B
      models), which the conversion drops.
    """
    if arch not in GEMMA_ARCHS:
        return {}
    fields: dict[str, Any] = {}
    tokens = reader.fields.get("tokenizer.ggml.tokens") or []
    if END_OF_TURN in tokens:
        eos = config.eos_token_id
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if (end_of_turn := tokens.index(END_OF_TURN)) not in eos:
            fields["eos_token_id"] = [*eos, end_of_turn]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := reader.fields.get(f"{arch}.{key}")) is not None:
            fields[key] = float(value)
    if arch == "gemma3":
        layers = int(reader.fields[f"{arch}.block_count"])
        heads = int(reader.fields[f"{arch}.attention.head_count"])
        hidden = int(reader.fields[f"{arch}.embedding_length"])
        fields["query_pre_attn_scalar"] = hidden // heads if layers == _GEMMA3_27B_LAYERS else config.head_dim
        scaling = reader.fields.get(f"{arch}.rope.scaling.type")
        rope = getattr(config, "rope_parameters", None)
        if scaling == "linear" and isinstance(rope, dict) and "full_attention" in rope:
            factor = float(reader.fields[f"{arch}.rope.scaling.factor"])
            full = {**rope["full_attention"], "rope_type": "linear", "factor": factor}
            fields["rope_parameters"] = {**rope, "full_attention": full}
    return fields
