"""Tiny EAGLE heads in the checkpoint layouts of the EAGLE repositories, for tests.

``save_eagle_head`` writes ``config.json`` and ``model.safetensors`` as an EAGLE-1 (``fc`` with a bias,
``layers.0.*`` with its unused ``input_layernorm``, no embedding or LM head: both shared from the target) or an
EAGLE-3 checkpoint (``fc`` over three hidden states, ``midlayer.*``, ``norm``, a draft LM head over a reduced
vocabulary, ``d2t``/``t2d``, no embedding). ``copy_head_of`` builds an EAGLE-1 head that reproduces a one-layer
target (see :func:`copy_target`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from ..conftest import save_tiny_model


def _head_config(target: Path, kind: str, draft_vocab: int | None, aux_ids: list[int] | None) -> dict:
    cfg = json.loads((target / "config.json").read_text())
    keep = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
    )
    out = {k: cfg[k] for k in keep if k in cfg}
    out.update(model_type="llama", num_hidden_layers=1, torch_dtype="float32")
    if kind == "EAGLE":
        out.update(architectures=["LlamaForCausalLMEagle"], bias=True)
    else:
        out.update(
            architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab or cfg["vocab_size"]
        )
        if aux_ids is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_ids}
    return out


def save_eagle_head(
    directory: Path,
    target: str,
    kind: str,
    seed: int = 0,
    draft_vocab: int | None = None,
    aux_ids: list[int] | None = None,
    drop: tuple[str, ...] = (),
    weights: dict[str, torch.Tensor] | None = None,
) -> str:
    """A random-weight head for the model at ``target`` (its shapes and rope); ``drop`` leaves tensors out,
    ``weights`` replaces the random ones."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = _head_config(Path(target), kind, draft_vocab, aux_ids)
    (directory / "config.json").write_text(json.dumps(cfg))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    prefix = "layers.0." if kind == "EAGLE" else "midlayer."
    attn_in = h if kind == "EAGLE" else 2 * h
    out = {
        f"{prefix}self_attn.q_proj.weight": rand(q, attn_in),
        f"{prefix}self_attn.k_proj.weight": rand(kv, attn_in),
        f"{prefix}self_attn.v_proj.weight": rand(kv, attn_in),
        f"{prefix}self_attn.o_proj.weight": rand(h, q),
        f"{prefix}mlp.gate_proj.weight": rand(inter, h),
        f"{prefix}mlp.up_proj.weight": rand(inter, h),
        f"{prefix}mlp.down_proj.weight": rand(h, inter),
        f"{prefix}input_layernorm.weight": torch.ones(h),
        f"{prefix}post_attention_layernorm.weight": torch.ones(h),
    }
    if kind == "EAGLE":
        out.update({"fc.weight": rand(h, 2 * h, scale=0.1), "fc.bias": torch.zeros(h)})
    else:
        vocab, dv = cfg["vocab_size"], cfg["draft_vocab_size"]
        hot = torch.randperm(vocab, generator=g)[:dv].sort().values  # the draft vocabulary, in target ids
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[hot] = True
        out.update(
            {
                "fc.weight": rand(h, 3 * h, scale=0.1),
                "midlayer.hidden_norm.weight": torch.ones(h),
                "norm.weight": torch.ones(h),
                "lm_head.weight": rand(dv, h),
                "d2t": hot - torch.arange(dv),
                "t2d": t2d,
            }
        )
    out.update(weights or {})
    out = {k: v.contiguous() for k, v in out.items() if k not in drop}
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def copy_target(directory: Path, smollm2_path: str | None) -> str:
    """A one-layer tiny Llama that an EAGLE-1 head can reproduce: token embeddings of unit RMS, input norm and
    final norm of weight 1 (so ``norm(embed(x)) == embed(x)`` and the final norm does not change the argmax)."""
    from ..conftest import _TINY_SHAPE

    config = LlamaConfig(**_TINY_SHAPE, num_hidden_layers=1, tie_word_embeddings=False)
    path = save_tiny_model(config, directory, smollm2_path)
    weights = load_file(str(directory / "model.safetensors"))
    e = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = e / e.pow(2).mean(dim=1, keepdim=True).sqrt()
    weights["model.layers.0.input_layernorm.weight"] = torch.ones(e.shape[1])
    weights["model.norm.weight"] = torch.ones(e.shape[1])
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return path


def copy_head_of(directory: Path, target: str) -> str:
    """An EAGLE-1 head whose row ``(x_{p+1}, f_p)`` computes the target's layer on ``x_{p+1}``: ``fc`` passes the
    embedding through and drops ``f``, the layer is the target's. It differs from the target only in attending
    over ``x_1 ..`` instead of ``x_0 ..`` (the head has no row for ``x_0``), so most drafts hold."""
    t = load_file(str(Path(target) / "model.safetensors"))
    h = t["model.embed_tokens.weight"].shape[1]
    weights = {
        name.removeprefix("model."): tensor
        for name, tensor in t.items()
        if name.startswith("model.layers.0.")
    }
    weights["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    weights["fc.bias"] = torch.zeros(h)
    return save_eagle_head(directory, target, "EAGLE", weights=weights)


class ReferenceHead:
    """The chain drafts an EAGLE-1 or EAGLE-3 head proposes, computed with transformers' Llama modules (target,
    decoder layer, norms, rotary) over the same checkpoints, recomputing every row from scratch at each draft
    step. Rows as SGLang's heads lay them out: row ``p`` is ``(x_{p+1}, f_p)`` at position ``p``; EAGLE-1's ``f``
    is the target's final normed hidden state and ``fc`` reads ``[embed, f]`` at every row; EAGLE-3's ``fc`` reads
    three captured target layer inputs, and its draft rows take the head's pre-norm output as ``f``."""

    def __init__(self, target: str, head: str, kind: str, capture: tuple[int, ...] = ()) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        self.kind, self.capture = kind, capture
        self.target = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        cfg = LlamaConfig.from_pretrained(head)
        cfg._attn_implementation = "eager"
        w = load_file(str(Path(head) / "model.safetensors"))
        w = {k.removeprefix("model."): v for k, v in w.items()}
        h = cfg.hidden_size
        prefix = "layers.0." if kind == "EAGLE" else "midlayer."
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        if kind == "EAGLE3":
            attn = self.layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attn, name)
                setattr(attn, name, torch.nn.Linear(2 * h, old.out_features, bias=False))
            self.layer.hidden_norm = LlamaRMSNorm(h, cfg.rms_norm_eps)
            self.norm = LlamaRMSNorm(h, cfg.rms_norm_eps)
            self.norm.load_state_dict({"weight": w["norm.weight"]})
        self.layer.load_state_dict({k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)})
        self.layer.eval()
        fc = w["fc.weight"]
        self.fc = torch.nn.Linear(fc.shape[1], fc.shape[0], bias="fc.bias" in w)
        self.fc.load_state_dict({k.removeprefix("fc."): v for k, v in w.items() if k.startswith("fc.")})
        own = w.get("embed_tokens.weight")
        self.embed = (
            self.target.model.embed_tokens if own is None else torch.nn.Embedding.from_pretrained(own)
        )
        self.lm_head_weight = w.get("lm_head.weight", self.target.lm_head.weight)
        self.d2t = w.get("d2t", torch.zeros(self.lm_head_weight.shape[0], dtype=torch.int64))
        self.rotary = LlamaRotaryEmbedding(cfg)

    def features(self, ids: list[int]) -> torch.Tensor:
        """[P, H] the head's hidden input for the target's positions ``0 .. P-1``."""
        body = self.target.model
        inputs: dict[int, torch.Tensor] = {}

        def keep(i: int):
            def hook(_module, args, kwargs):
                inputs[i] = (args[0] if args else kwargs["hidden_states"])[0]

            return hook

        hooks = [
            layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(body.layers)
        ]
        hooks.append(body.norm.register_forward_pre_hook(keep(len(body.layers)), with_kwargs=True))
        try:
            self.target(input_ids=torch.tensor([ids]))
        finally:
            for hook in hooks:
                hook.remove()
        if self.kind == "EAGLE":
            return body.norm(inputs[len(body.layers)])
        return self.fc(torch.cat([inputs[i] for i in self.capture], dim=-1))

    def _rows(self, tokens: list[int], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal pass over rows ``(tokens, hidden)``: (the head's output, its logits over the draft vocab)."""
        n = len(tokens)
        e = self.embed(torch.tensor(tokens))
        cos_sin = self.rotary(e[None], torch.arange(n)[None])
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        layer = self.layer
        if self.kind == "EAGLE":
            residual = self.fc(torch.cat([e, hidden], dim=-1))
            x = residual  # EAGLE-1's layer 0 has no input norm
        else:
            residual = hidden
            x = torch.cat([layer.input_layernorm(e), layer.hidden_norm(hidden)], dim=-1)
        a = layer.self_attn(hidden_states=x[None], position_embeddings=cos_sin, attention_mask=mask)[0][0]
        h = a + residual
        out = layer.mlp(layer.post_attention_layernorm(h)) + h
        to_logits = out if self.kind == "EAGLE" else self.norm(out)
        return out, to_logits @ self.lm_head_weight.T

    @torch.no_grad()
    def drafts(self, seq: list[int], k: int) -> list[int]:
        """The ``k`` chain drafts after ``seq`` (its last token is the newest, at position ``len(seq) - 1``)."""
        tokens, hidden = list(seq[1:]), self.features(seq[:-1])
        out = []
        for _ in range(k):
            head_out, logits = self._rows(tokens, hidden)
            i = int(logits[-1].argmax())
            out.append(i + int(self.d2t[i]))
            tokens.append(out[-1])
            hidden = torch.cat([hidden, head_out[-1:]])
        return out


def save_head_for_family(
    directory: Path,
    target: str,
    kind: str,
    seed: int = 0,
    draft_vocab: int | None = None,
    aux_ids: list[int] | None = None,
) -> str:
    """A random head for a target of any family, shaped as a plain Llama layer of the target's width (4 query
    heads on 2 KV heads of 16, default rope), as EAGLE heads trained for non-Llama targets are: a head's config
    copied from an MLA (DeepSeek) or per-layer-type-rope (Gemma 3) config would not be a Llama layer."""
    cfg = json.loads((Path(target) / "config.json").read_text())
    shape = {
        k: cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "bos_token_id", "eos_token_id")
    }
    shape.update(
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    like = directory.parent / f"{directory.name}_shape"
    like.mkdir(parents=True, exist_ok=True)
    (like / "config.json").write_text(json.dumps(shape))
    return save_eagle_head(directory, str(like), kind, seed=seed, draft_vocab=draft_vocab, aux_ids=aux_ids)


def record_drafts(
    engine, prompt: list[int], sampling_params: dict
) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Run one request through ``engine`` (an in-process ``sgl_ray.Engine`` with a model drafter) and return its
    whole sequence (prompt and output) and each chain the drafter proposed, with the prefix length it followed."""
    draft = engine._core.runner.spec.draft
    seen: list[tuple[int, list[int]]] = []
    real = draft.draft

    def recording(plan, input_ids):  # the real drafter, its drafts noted
        drafts, ids = real(plan, input_ids)
        for row, v in enumerate(plan.draft_lens.nonzero()[0] if len(plan.draft_lens) else []):
            seen.append((int(plan.prefix_lens[v]), drafts.tokens[row, : plan.draft_lens[v]].tolist()))
        return drafts, ids

    draft.draft = recording
    try:
        out = engine.generate(input_ids=prompt, sampling_params=sampling_params)
    finally:
        del draft.draft
    return prompt + out["output_ids"], seen
