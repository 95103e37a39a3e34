"""Train an EAGLE head (EAGLE-1 layout) for a target model by self-distillation, and measure it.

1. The target writes the data: the in-process engine answers chat prompts (sampled, several answers each).
2. transformers runs the target over those sequences for the teacher: its last hidden state ``f_p`` (after the
   final norm) at every position.
3. The head learns, at row ``p``, from ``(embed(x_{p+1}), f_p)`` to predict ``f_{p+1}`` (smooth L1) and the
   target's next-token distribution through the target's LM head (cross entropy), with noise on its input
   features so that it tolerates its own predictions at later draft steps (EAGLE's recipe).
4. The head is saved as an EAGLE checkpoint (``config.json`` + ``model.safetensors``: ``fc``, ``layers.0.*``; the
   embedding and LM head are the target's) and measured: greedy outputs with and without
   ``speculative_algorithm="EAGLE"`` must be identical; it prints the accepted length per verify step.

Run (SmolLM2-135M-Instruct, the embedded default model; CUDA when there is one)::

    .venv/bin/python examples/train_eagle.py --out /tmp/smollm2-eagle
    .venv/bin/python -c "import sgl_ray; sgl_ray.Engine(speculative_algorithm='EAGLE', \\
        speculative_draft_model_path='/tmp/smollm2-eagle')"

A tiny CPU run: ``--device cpu --num-prompts 4 --samples 1 --max-new-tokens 16 --steps 5``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import sgl_ray
from sgl_ray.model_loader import default_model_path

TOPICS = (
    "the ocean", "volcanoes", "bread baking", "chess", "the moon", "honey bees", "bicycles", "rainforests",
    "electric cars", "the Roman Empire", "photosynthesis", "jazz music", "coffee", "earthquakes", "penguins",
    "solar panels", "the human heart", "origami", "mountain climbing", "the internet", "dinosaurs", "tea",
    "glaciers", "airplanes", "the printing press", "recycling", "football", "black holes", "gardening",
    "the piano", "vaccines", "deserts", "trains", "libraries", "clouds", "cheese", "robots", "bridges",
    "friendship", "sleep",
)  # fmt: skip
TASKS = (
    "Write a short paragraph about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three interesting facts about {}.",
    "Write a short poem about {}.",
    "What are the pros and cons of {}?",
    "Describe the history of {} in a few sentences.",
    "Write a short story that involves {}.",
    "List five questions someone might ask about {}.",
)
EVAL = (
    "Tell me about the history of tea.",
    "How do I learn to play the guitar?",
    "Write a story about a lost cat.",
)


def chat_prompts(tokenizer, num: int, seed: int) -> list[list[int]]:
    """``num`` chat prompts as token ids (a fixed shuffle of topic x task), or random ids without a tokenizer."""
    rng = random.Random(seed)
    if tokenizer is None:
        return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 24))] for _ in range(num)]
    texts = [task.format(topic) for topic in TOPICS for task in TASKS]
    rng.shuffle(texts)
    return [_chat(tokenizer, t) for t in (texts * (num // len(texts) + 1))[:num]]


def _chat(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def generate_data(model: str, args: argparse.Namespace) -> list[list[int]]:
    """Sequences ``prompt + answer`` written by the target itself."""
    with sgl_ray.Engine(model, device=args.device, max_total_tokens=args.engine_tokens) as llm:
        prompts = chat_prompts(llm.tokenizer, args.num_prompts, args.seed)
        params = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "n": args.samples}
        outs = llm.generate(input_ids=prompts, sampling_params={**params, "seed": args.seed})
    per = args.samples
    return [prompts[i // per] + o["output_ids"] for i, o in enumerate(outs)]


def load_target(model: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    p = Path(model)
    if p.suffix == ".gguf":
        target = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    else:
        target = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return target.to(device).eval().requires_grad_(False)


@torch.no_grad()
def teacher_features(target: nn.Module, seqs: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The target's last hidden state (after its final norm) of every position of each sequence, [n, H]."""
    return [
        target.model(torch.tensor([s], device=device)).last_hidden_state[0].to(torch.bfloat16) for s in seqs
    ]


class EagleHead(nn.Module):
    """EAGLE-1's head in plain torch, with its checkpoint's parameter names: ``fc`` over ``[embed, feature]``,
    one Llama layer without the input norm, no final norm."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        h, inter = config.hidden_size, config.intermediate_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.heads
        bias = bool(getattr(config, "attention_bias", False))
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(config=config)

    def init_from(self, layer: nn.Module) -> None:
        """Start from one of the target's decoder layers (its attention, MLP and post-attention norm)."""
        own = dict(self.named_parameters())
        for name, p in layer.named_parameters():
            key = name.split(".", 1)[-1] if name.startswith(("self_attn.", "mlp.")) else name
            if key in own and own[key].shape == p.shape:
                own[key].data.copy_(p.data)

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:  # [B, T, H] x 2 -> [B, T, H]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = self.fc(torch.cat([embeds, features], dim=-1))
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(x, torch.arange(t, device=x.device)[None])  # row p sits at position p
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        y = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def checkpoint(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The EAGLE-1 checkpoint tensors (``layers.0.*``; its unused ``input_layernorm`` too, as EAGLE's have)."""
        out = {"fc.weight": self.fc.weight, "fc.bias": self.fc.bias}
        for name, p in self.named_parameters():
            if name.startswith(("q_", "k_", "v_", "o_")):
                out[f"layers.0.self_attn.{name}"] = p
            elif name.startswith(("gate_", "up_", "down_")):
                out[f"layers.0.mlp.{name}"] = p
            elif name.startswith("post_"):
                out[f"layers.0.{name}"] = p
        out["layers.0.input_layernorm.weight"] = torch.ones_like(self.post_attention_layernorm.weight)
        return {k: v.detach().to(dtype).cpu().contiguous() for k, v in out.items()}


def train(target: nn.Module, seqs: list[list[int]], feats: list[torch.Tensor], args, device) -> EagleHead:
    head = EagleHead(target.config).to(device)
    head.init_from(target.model.layers[-1])
    embed, lm_head = target.model.embed_tokens, target.lm_head
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    rng = random.Random(args.seed)
    order = list(range(len(seqs)))
    t0 = time.time()
    for step in range(args.steps):
        batch = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        if step * args.batch_size % len(order) < args.batch_size:
            rng.shuffle(order)
        n = min(max(len(seqs[i]) for i in batch), args.seq_len)
        ids = torch.zeros(len(batch), n, dtype=torch.long, device=device)
        f = torch.zeros(len(batch), n, target.config.hidden_size, device=device)
        mask = torch.zeros(len(batch), n, device=device)
        for r, i in enumerate(batch):
            m = min(len(seqs[i]), n)
            ids[r, :m] = torch.tensor(seqs[i][:m], device=device)
            f[r, :m] = feats[i][:m].float()
            mask[r, : m - 1] = 1.0  # row p is trained on f_{p+1}
        # rows p = 0 .. n-2: (embed(x_{p+1}), f_p) -> f_{p+1}
        noisy = f[:, :-1] + (torch.rand_like(f[:, :-1]) - 0.5) * 2 * args.noise * f[:, :-1].std()
        pred = head(embed(ids[:, 1:]), noisy)
        want = f[:, 1:]
        m = mask[:, :-1]
        vloss = (F.smooth_l1_loss(pred, want, reduction="none").mean(-1) * m).sum() / m.sum()
        with torch.no_grad():
            teacher = F.softmax(lm_head(want), dim=-1)
        ploss = (-(teacher * F.log_softmax(lm_head(pred), dim=-1)).sum(-1) * m).sum() / m.sum()
        loss = vloss + args.p_weight * ploss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            with torch.no_grad():
                top1 = ((lm_head(pred).argmax(-1) == teacher.argmax(-1)).float() * m).sum() / m.sum()
            print(f"step {step:5d}  loss {loss.item():.4f}  (feature {vloss.item():.4f}, token {ploss.item():.3f})"
                  f"  top-1 {top1.item():.3f}  {time.time() - t0:.0f}s", flush=True)  # fmt: skip
    return head


def save_head(head: EagleHead, target_config, out: Path) -> None:
    """``config.json`` (the target's Llama config with one layer, SGLang's architecture name) and the weights."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = target_config.to_dict()
    cfg.update(
        num_hidden_layers=1,
        architectures=["LlamaForCausalLMEagle"],
        bias=True,
        model_type="llama",
        dtype="bfloat16",
    )
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    save_file(head.checkpoint(), str(out / "model.safetensors"), metadata={"format": "pt"})


def evaluate(model: str, head: Path, args) -> dict:
    """Greedy answers to held-out prompts with and without the head: identical outputs, accept length, tok/s."""
    params = {"temperature": 0.0, "max_new_tokens": args.eval_tokens}
    results = {}
    for spec in (False, True):
        extra = dict(speculative_algorithm="EAGLE", speculative_draft_model_path=str(head)) if spec else {}
        with sgl_ray.Engine(model, device=args.device, max_total_tokens=args.engine_tokens, **extra,
                            speculative_num_steps=args.num_steps if spec else None) as llm:  # fmt: skip
            tok = llm.tokenizer
            prompts = (
                [_chat(tok, p) for p in EVAL] if tok is not None else chat_prompts(None, 3, args.seed + 1)
            )
            llm.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 4})  # warm-up
            t0, outs = time.perf_counter(), []
            for p in prompts:  # one at a time: batch-1 decoding, where speculation pays
                outs.append(llm.generate(input_ids=p, sampling_params=params))
            dt = time.perf_counter() - t0
            results[spec] = ([o["output_ids"] for o in outs], sum(len(o["output_ids"]) for o in outs) / dt)
            if spec:
                stats = llm.get_stats()
    identical = results[True][0] == results[False][0]
    report = {
        "identical": identical,
        "accept_length": stats["spec_accept_length"],
        "accept_rate": stats["spec_accept_rate"],
        "tok_s_off": results[False][1],
        "tok_s_eagle": results[True][1],
    }
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--out", required=True, help="directory to write the EAGLE checkpoint to")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.1, help="uniform noise on input features, x their std")
    ap.add_argument("--p-weight", type=float, default=0.1, help="weight of the token loss (EAGLE: 0.1)")
    ap.add_argument("--num-steps", type=int, default=4, help="speculative_num_steps of the evaluation")
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--engine-tokens", type=int, default=200_000, help="the engine's KV pool, in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = args.model or str(default_model_path())
    t0 = time.time()
    seqs = generate_data(model, args)
    print(f"data: {len(seqs)} sequences, {sum(map(len, seqs))} tokens ({time.time() - t0:.0f}s)", flush=True)
    target = load_target(model, device)
    feats = teacher_features(target, seqs, device)
    head = train(target, seqs, feats, args, device)
    save_head(head, target.config, Path(args.out))
    print(f"saved {args.out} ({time.time() - t0:.0f}s)", flush=True)
    del target, feats
    return {} if args.no_eval else evaluate(model, Path(args.out), args)


if __name__ == "__main__":
    main()
