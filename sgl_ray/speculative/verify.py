"""Verifying chain drafts on the runner's device, after the target's forward pass and the sampler.

A verify entry with drafts ``d_1..d_k`` extended ``[x, d_1..d_k]`` (``x`` its last accepted token), so the target
has a distribution for every position::

    rows:      x      d_1     ...    d_k
    target:    p_0    p_1     ...    p_k        (p_i: the next token's distribution after x, d_1..d_i)
    sampled:   t_0    t_1     ...    t_k        (the sampler's token of each row: seed, position, p_i)

It keeps ``m`` drafts and emits ``m + 1`` tokens, written over its rows: ``d_1..d_m`` then one more.

* Greedy rows, and sampled rows whose draft is deterministic (NGRAM): accept ``d_i`` while ``t_{i-1} == d_i``;
  the emitted tokens are then ``t_0..t_m``. ``t_i`` is exactly the token decoding without speculation samples at
  that position after the same tokens (the sampler's noise is a function of the seed and the position), so the
  output is the same token for token, greedy or seeded. In distribution this is the rule for a deterministic
  draft: ``d_i`` is kept with probability ``p_{i-1}(d_i)``, else the token is drawn from ``p_{i-1}`` without
  ``d_i``, renormalised (a Gumbel-max draw conditioned on not being ``d_i``).
* Sampled rows of a draft model (STANDALONE), which drew ``d_i`` from its own ``q_i``: the standard rule — keep
  ``d_i`` if ``u_i * q_i(d_i) < p_{i-1}(d_i)``; at the first rejection emit a draw from
  ``norm(max(0, p_{i-1} - q_i))`` (inverse CDF); when every draft is kept, ``t_k`` is the bonus token. The uniforms
  of both are hashes of the request's seed and position (independent of the draft's own noise), so seeded
  requests are reproducible.

``p`` and ``q`` are the distributions the sampler draws from: temperature, top-k, top-p, min-p and logit bias
applied (:func:`processed_logprobs`); ``p`` under the row's grammar mask for constrained requests (``q``, the
draft model's, is unconstrained: drafts the grammar rejects have ``p = 0`` and are rejected).

Penalties and ``min_new_tokens``: ``p_i`` is the distribution after ``d_1..d_i``, so row ``i`` counts those drafts
as emitted tokens (frequency and presence counts, the repetition penalty's seen set, and ``num_generated + i``
for the ``min_new_tokens`` mask) — :func:`draft_paths` builds these offsets (:mod:`sgl_ray.sampling.offsets`) for
the sampler's draw of every row, the acceptance test's ``p`` and a tree's draws again; for trees row ``i`` counts
the node's ancestors and itself. After verification the sampling state records all ``m + 1`` emitted tokens.
``q`` needs no such care: the rule is exact for any ``q`` the drafts were drawn from (the draft model samples
without penalties).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from sgl_ray.sampling import noise
from sgl_ray.sampling.bitmask import apply_token_bitmask_
from sgl_ray.sampling.filters import select_candidates
from sgl_ray.sampling.offsets import ChunkPaths, RowOffsets, chain_paths
from sgl_ray.sampling.penalties import process_logits
from sgl_ray.sampling.state import SamplingState
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.tree import DraftTree, accept_tree, ancestor_masks
from sgl_ray.transfer import to_device

# "Token ids" no vocabulary has: the accept test's and the residual draw's uniforms are hashes of their own
_ACCEPT_SALT = 2**31 - 1
_RESIDUAL_SALT = 2**31 - 2


class Drafts(NamedTuple):
    """The drafts of a step's verify entries (those with ``plan.draft_lens > 0``, in batch order)."""

    tokens: torch.Tensor  # [Bv, K] int64, K = max draft length; padding past each entry's length
    log_probs: (
        torch.Tensor | None
    )  # [Bv, K, V] the draft model's log q (sampled entries); None: deterministic
    tree: DraftTree | None = None  # tree drafts (``speculative.tree``): ``tokens`` are the nodes


class Verified(NamedTuple):
    tokens: torch.Tensor  # [S] sampled rows, verify entries' rows overwritten with what they emit
    logprobs: torch.Tensor | None  # [S]
    emitted: torch.Tensor  # [B] tokens each entry emits (verify entries: kept drafts + 1; others: their rows)


def ngram_drafts_of(plan: StepPlan, device: torch.device) -> Drafts:
    """The drafts a plan carries in its ``input_ids`` (after each verify entry's first token), and with
    ``draft_parents`` (NGRAM trees) the tree they form."""
    lens = plan.draft_lens
    verify = np.flatnonzero(lens > 0)
    k = int(lens.max())
    starts = np.cumsum(plan.extend_lens) - plan.extend_lens
    cols = np.arange(k)
    pos = np.minimum(starts[verify, None] + 1 + cols[None, :], (starts + plan.extend_lens)[verify, None] - 1)
    tokens = to_device(plan.input_ids[pos], device)  # [Bv, K]
    if not len(plan.draft_parents):
        return Drafts(tokens, None)
    sizes = lens[verify]
    node = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # each draft's column
    owner = np.repeat(np.arange(len(verify)), sizes)
    parents = np.zeros((len(verify), k), dtype=np.int64)  # padding past a tree's size: children of the root
    parents[owner, node] = plan.draft_parents
    depths = np.zeros((len(verify), k + 1), dtype=np.int64)
    for c in range(k):  # parents first: a node's parent row is already done
        depths[:, c + 1] = np.take_along_axis(depths, parents[:, c : c + 1], axis=1)[:, 0] + 1
    tree = DraftTree(tokens, to_device(parents, device), to_device(depths, device), sizes)
    return Drafts(tokens, None, tree)


def draft_paths(
    plan: StepPlan, drafts: Drafts, state: SamplingState, ancestors: torch.Tensor | None = None
) -> ChunkPaths | None:
    """The drafts each row of the plan's verify entries counts as emitted (see the module note), for the entries
    whose sampling reads them; None when none does. ``ancestors``: a tree step's ``ancestor_masks``, where the
    caller has them."""
    verify_idx = np.flatnonzero(plan.draft_lens > 0)  # [Bv]
    counted = np.flatnonzero(state.reads_output(plan.req_pool_idxs[verify_idx]))  # [Bc]
    if len(counted) == 0:
        return None
    index = np.full(len(verify_idx), -1, dtype=np.int64)
    index[counted] = np.arange(len(counted))
    dev = drafts.tokens.device
    sel = to_device(counted, dev)
    drafted = drafts.tokens[sel]  # [Bc, K]
    tokens = torch.cat([torch.zeros_like(drafted[:, :1]), drafted], dim=1)  # [Bc, K + 1]; column 0: x
    if drafts.tree is None:
        path = to_device(chain_paths(plan.draft_lens[verify_idx][counted], tokens.shape[1]), dev)
    else:
        masks = ancestors if ancestors is not None else ancestor_masks(drafts.tree)
        path = masks[sel].clone()  # [Bc, N + 1, N + 1] ancestors and the node itself
        path[:, :, 0] = False
    return ChunkPaths(index, tokens, path)


def verify_row_offsets(plan: StepPlan, paths: ChunkPaths) -> RowOffsets:
    """The offsets of the plan's sampled rows: a verify entry's row ``i`` is column ``i`` of its chunk."""
    counts = plan.sample_row_counts()
    verify_idx = np.flatnonzero(plan.draft_lens > 0)
    start = (np.cumsum(counts) - counts)[verify_idx]  # [Bv] first sampled row of each verify entry
    n = counts[verify_idx]
    cols = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    entries = np.repeat(np.arange(len(verify_idx)), n)
    return paths.offsets(np.repeat(start, n) + cols, entries, cols, int(counts.sum()))


def _chunk_offsets(paths: ChunkPaths | None, entries: np.ndarray, cols: np.ndarray) -> RowOffsets | None:
    """The offsets of rows ``[E, C]`` of chunk columns ``cols`` ([E, C]) of verify entries ``entries`` ([E])."""
    if paths is None:
        return None
    c = cols.shape[1]
    n = len(entries) * c
    return paths.offsets(np.arange(n), np.repeat(entries, c), cols.reshape(-1), n)


def verify(
    plan: StepPlan,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor | None,
    state: SamplingState,
    drafts: Drafts,
    paths: ChunkPaths | None = None,
) -> Verified:
    """Accept the drafts of the plan's verify entries (see the module note). ``logits`` [S, V] and ``tokens`` [S]
    are the sampled rows (each request's last ``sample_row_counts()`` rows) and the sampler's tokens for them;
    ``paths``: the drafts the rows count as emitted (:func:`draft_paths`), which the sampler counted too."""
    device = tokens.device
    counts = plan.sample_row_counts()
    lens = plan.draft_lens
    verify_idx = np.flatnonzero(lens > 0)  # [Bv]
    k = int(lens[verify_idx].max())
    row_start = np.cumsum(counts) - counts  # [B] first sampled row of each entry
    cols = np.arange(k + 1)
    valid_np = cols[None, :] <= lens[verify_idx, None]  # [Bv, K+1] rows the entry has
    rows_np = row_start[verify_idx, None] + np.minimum(cols[None, :], lens[verify_idx, None])
    rows = to_device(rows_np, device)  # [Bv, K+1] sampled-row index (padding repeats the last row)
    drafted = to_device(valid_np[:, 1:], device)  # [Bv, K] which draft columns exist
    t = tokens[rows]  # [Bv, K+1]
    d = drafts.tokens  # [Bv, K]
    keep = (t[:, :-1] == d) & drafted  # deterministic drafts: the sampler agrees
    out_rows = t
    slots_np = plan.req_pool_idxs[verify_idx]
    sampled_np = ~state.greedy_slots(slots_np)
    resampled = None
    if drafts.log_probs is not None and sampled_np.any():
        sel = np.flatnonzero(sampled_np)
        sel_dev = to_device(sel, device)
        keep_s, rows_s = _rejection_sample(
            _masked(logits, rows[sel_dev], plan.vocab_mask),  # [Bs, K+1, V]
            t[sel_dev],
            d[sel_dev],
            drafts.log_probs[sel_dev],
            drafted[sel_dev],
            state,
            slots_np[sel],
            to_device((plan.prefix_lens + 1)[verify_idx][sel], device),
            _chunk_offsets(paths, sel, np.minimum(cols[None, :], lens[verify_idx][sel, None])),
        )
        keep = keep.clone()
        keep[sel_dev] = keep_s
        out_rows = out_rows.clone()
        out_rows[sel_dev] = rows_s
        resampled = rows[sel_dev]  # rows whose tokens may differ from the sampler's
    m = torch.cumprod(keep.to(torch.int64), dim=1).sum(dim=1)  # [Bv] kept drafts
    emitted = to_device(counts.astype(np.int64), device)
    emitted[to_device(verify_idx, device)] = m + 1
    tokens = tokens.clone()
    tokens[rows[to_device(valid_np, device)]] = out_rows[to_device(valid_np, device)]
    if logprobs is not None and resampled is not None:
        flat = resampled.reshape(-1)
        logprobs = logprobs.clone()
        lse = torch.logsumexp(logits[flat].float(), dim=-1)
        logprobs[flat] = logits[flat].float().gather(1, tokens[flat, None]).squeeze(1) - lse
    return Verified(tokens, logprobs, emitted)


def _masked(logits: torch.Tensor, rows: torch.Tensor, vocab_mask: np.ndarray | None) -> torch.Tensor:
    """``logits[rows]`` (any shape of sampled-row indices), -inf where the row's grammar mask forbids the token:
    the target's distribution the sampler drew from (structured outputs)."""
    out = logits[rows]
    if vocab_mask is None:
        return out
    flat = rows.reshape(-1)
    mask = to_device(vocab_mask, logits.device)[flat]
    return apply_token_bitmask_(out.reshape(len(flat), -1), mask).view(out.shape)


def _rejection_sample(
    logits: torch.Tensor,  # [Bs, K+1, V] target rows
    t: torch.Tensor,  # [Bs, K+1] the sampler's tokens
    d: torch.Tensor,  # [Bs, K] drafts
    log_q: torch.Tensor,  # [Bs, K, V] the draft model's log-distributions
    drafted: torch.Tensor,  # [Bs, K]
    state: SamplingState,
    slots_np: np.ndarray,  # [Bs]
    first_pos: torch.Tensor,  # [Bs] position of d_1
    offsets: RowOffsets | None,  # of the [Bs * (K+1)] target rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(1, p/q) rule for sampled entries of a draft model. Returns (kept [Bs, K], emitted rows [Bs, K+1]):
    rows before the first rejection hold the drafts, the row of the first rejection its residual draw (the bonus
    ``t_k`` when nothing is rejected)."""
    bs, k1, v = logits.shape
    k = k1 - 1
    dev = logits.device
    log_p = processed_logprobs(logits.reshape(bs * k1, v), state, np.repeat(slots_np, k1), offsets)
    log_p = log_p.view(bs, k1, v)
    seed_key = state.seed_key[to_device(slots_np, dev)]  # [Bs]
    pos = first_pos[:, None] + torch.arange(k1, device=dev)[None, :]  # [Bs, K+1] d_1 .. d_k + 1
    keys = noise.row_keys(seed_key[:, None].expand(bs, k1).reshape(-1), pos.reshape(-1)).view(bs, k1)
    salts = noise.token_keys(torch.tensor([_ACCEPT_SALT, _RESIDUAL_SALT], device=dev))
    u = noise.uniform(keys.reshape(-1), salts).view(bs, k1, 2)  # [Bs, K+1, 2]: accept test, residual draw
    p_d = log_p[:, :k].gather(2, d[:, :, None]).squeeze(2).exp()
    q_d = log_q.gather(2, d[:, :, None]).squeeze(2).exp()
    keep = (u[:, :k, 0] * q_d < p_d) & drafted  # [Bs, K]
    m = torch.cumprod(keep.to(torch.int64), dim=1).sum(dim=1)  # [Bs] kept drafts
    lens = drafted.sum(dim=1)  # [Bs] drafts of each entry
    # The residual at row m (used where m < lens): max(0, p_m - q_{m+1}), or p_m where that is all zero; one
    # inverse-CDF draw with the row's second uniform.
    b = torch.arange(bs, device=dev)
    p_m = log_p[b, m].exp()  # [Bs, V]
    residual = (p_m - log_q[b, m.clamp(max=k - 1)].exp()).clamp_(min=0)
    cdf = residual.cumsum_(dim=1)
    cdf = torch.where(cdf[:, -1:] > 0, cdf, p_m.cumsum(dim=1))
    draw = torch.searchsorted(cdf, (u[b, m, 1] * cdf[:, -1])[:, None].contiguous(), right=True).squeeze(1)
    draw = draw.clamp_(max=v - 1)
    last = torch.where(m < lens, draw, t[b, m])  # a residual draw, or the bonus token t_m (m == lens)
    col = torch.arange(k1, device=dev)[None, :]
    rows = torch.where(col < m[:, None], torch.cat([d, d[:, -1:]], dim=1), t)  # [Bs, K+1]
    rows = torch.where(col == m[:, None], last[:, None], rows)
    return keep, rows


def processed_logprobs(
    logits: torch.Tensor, state: SamplingState, slots_np: np.ndarray, offsets: RowOffsets | None = None
) -> torch.Tensor:
    """[R, V] log of the distribution the sampler draws row ``i`` from (``slots_np[i]``'s temperature, top-k,
    top-p, min-p, logit bias, penalties and ``min_new_tokens`` mask, with ``offsets``: the tokens each row counts
    as emitted; -inf outside the kept set). Rows of sampled, not greedy, requests."""
    slots = to_device(slots_np, logits.device)
    plan = state.plan(slots_np)
    x = logits.float()
    if plan.needs_processing:
        x = process_logits(x.clone() if x is logits else x, state, slots, plan, offsets)
    z = x / state.temperature[slots].unsqueeze(1)  # a new tensor: the caller's logits stay as they were
    cutoff = select_candidates(z, state, slots, plan, truncate=False).cutoff
    z.masked_fill_(z < cutoff, float("-inf"))
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def verify_tree(
    plan: StepPlan,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor | None,
    state: SamplingState,
    tree: DraftTree,
    resample: Callable[[torch.Tensor, np.ndarray, torch.Tensor, RowOffsets | None], torch.Tensor],
    paths: ChunkPaths | None = None,
) -> tuple[Verified, torch.Tensor, torch.Tensor]:
    """Accept the draft trees of the plan's verify entries (``speculative.tree``). ``resample(logits, slots,
    positions, offsets)`` draws the sampler's tokens again for sampled entries' rows at their tree positions
    (their logits already under the rows' grammar masks; ``offsets``: the nodes each row counts as emitted, from
    ``paths``, see :func:`draft_paths`). Returns the verification, the accepted paths ([Bv, D + 1] chunk rows) and
    the accepted node counts ([Bv])."""
    device = tokens.device
    counts = plan.sample_row_counts()
    verify_idx = np.flatnonzero(plan.draft_lens > 0)  # [Bv]
    n = tree.parents.shape[1]
    row_start = (np.cumsum(counts) - counts)[verify_idx]  # [Bv] first sampled row of each entry
    rows_np = row_start[:, None] + np.minimum(np.arange(n + 1)[None, :], tree.sizes[:, None])  # [Bv, N + 1]
    rows = to_device(rows_np, device)
    target = tokens[rows]  # [Bv, N + 1] the target's token at each chunk row
    slots_np = plan.req_pool_idxs[verify_idx]
    sampled = np.flatnonzero(~state.greedy_slots(slots_np))
    if len(sampled):  # the sampler drew at row positions; a node's next token is at P + depth + 1
        sel = to_device(sampled, device)
        flat = rows[sel].reshape(-1)
        positions = to_device(plan.prefix_lens[verify_idx][sampled], device)[:, None] + tree.depths[sel] + 1
        cols = np.minimum(np.arange(n + 1)[None, :], tree.sizes[sampled, None])  # [Bs, N + 1]
        drawn = resample(
            _masked(logits, flat, plan.vocab_mask),
            np.repeat(slots_np[sampled], n + 1),
            positions.reshape(-1),
            _chunk_offsets(paths, sampled, cols),
        )
        target = target.clone()
        target[sel] = drawn.view(len(sampled), n + 1)
    walk = accept_tree(target, tree)
    depth = walk.path.shape[1]
    keep = torch.arange(depth, device=device)[None, :] <= walk.accepted[:, None]  # [Bv, D + 1]
    out_rows = rows[:, :depth][keep]  # the entries' first m + 1 rows
    src_rows = rows.gather(1, walk.path)[keep]  # the chunk rows whose distributions gave them
    tokens = tokens.clone()
    tokens[out_rows] = walk.tokens[keep]
    if logprobs is not None:
        logprobs = logprobs.clone()
        lse = torch.logsumexp(logits[src_rows].float(), dim=-1)
        logprobs[out_rows] = logits[src_rows].float().gather(1, tokens[out_rows, None]).squeeze(1) - lse
    emitted = to_device(counts.astype(np.int64), device)
    emitted[to_device(verify_idx, device)] = walk.accepted + 1
    return Verified(tokens, logprobs, emitted), walk.path, walk.accepted
