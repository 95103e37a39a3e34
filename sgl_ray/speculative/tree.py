"""Tree drafts (``speculative_eagle_topk`` > 1): the search that builds a draft tree, the branch rows its draft
passes read, and the verification of a tree in one target forward.

**Search** (SGLang's, on the device). Scores are cumulative draft log-probs. Pass 0 gives the root's distribution:
its ``topk`` best children are the frontier at depth 1. Each later pass runs the frontier's ``topk`` nodes and
scores their ``topk`` best children each; the ``topk`` best of those ``topk**2`` are the next frontier. After
``num_steps`` depths the tree keeps the best ``n`` of every scored node (``n``: the request's draft count). A
child's score is at most its parent's, and candidates are ranked by a stable sort in the order they were scored
(shallower first), so every kept node's parent is kept too and comes before it.

**Draft passes** run each frontier node as a decode row of its own (:class:`BranchRows`): a private request-table
row maps the request's positions ``0 .. P`` (``P``: the newest token's position) to the shared table's slots and
``P + 1 .. P + j`` to the branch's own draft KV, written in scratch slots past the end of the draft's KV pool. The
draft KV of the tree is thrown away; the next step recomputes the accepted tokens' rows (as SGLang's draft extend
after verification does).

**Verification.** A verify entry runs ``[x, n_1 .. n_N]`` (``x``: its newest token, the root; ``n_i`` the nodes,
parents first): row ``i`` sits at position ``P + depth(i)`` and sees the request's prefix, its ancestors and
itself (``attention.base.TreeMask``). Acceptance walks from the root: at node ``c`` the target's token ``t_c`` (the
sampler's token at position ``P + depth(c) + 1``, the path to ``c`` counted as emitted for penalties and
``min_new_tokens``; the argmax when greedy) is emitted, and the walk moves to the child whose token is ``t_c``
while there is one. Drafts are deterministic (the drafter's top-k), so this is sampling from the target and
checking the tree: seeded or greedy, the output is token for token the one decoding without speculation gives.
The accepted path's KV is then copied to the entry's first rows' slots (row ``i`` of the path to chunk row ``i``;
a path node's row is at least its depth, so copying in depth order never overwrites a source), which is where
the scheduler's rollback (``KVCacheManager.truncate``) expects it. In hybrid pools (``mem_cache.hybrid_swa``) the
windowed layers' KV moves the same way between the rows' SWA slots (the chunk's pages each map to their own SWA
page)::

    chunk rows:   x   n_1  n_2  n_3  n_4  n_5         accepted path x -> n_2 -> n_5 (depths 0, 1, 2)
    after copy:   x   n_2  n_5  ...                   rows 0 .. 2 kept, the rest freed by the rollback
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from sgl_ray.attention.base import TreeMask
from sgl_ray.transfer import to_device

# expand(depth j, tokens [Bv, k], origin [Bv, k]) -> the children's log-probs [Bv, k, V]: runs the frontier at
# depth j, node f a child of row origin[:, f] of the previous pass
Expand = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class TreeShape(NamedTuple):
    topk: int  # children per expanded node
    num_steps: int  # draft passes: the tree's depth


class DraftTree(NamedTuple):
    """The draft trees of a step's verify entries, in batch order; chunk row 0 is the root ``x``."""

    tokens: torch.Tensor  # [Bv, N] node tokens (chunk rows 1 .. N), N = the largest tree; padding past n
    parents: torch.Tensor  # [Bv, N] chunk row of each node's parent
    depths: torch.Tensor  # [Bv, N + 1] depth of each chunk row (the root 0)
    sizes: np.ndarray  # [Bv] nodes of each tree


def search_tree(
    root_logprobs: torch.Tensor,  # [Bv, V] the draft's next-token log-probs after x
    expand: Expand,
    topk: int,
    num_steps: int,
    sizes: np.ndarray,  # [Bv] nodes to keep per request
    to_target: Callable[[torch.Tensor], torch.Tensor] | None = None,  # draft ids -> target ids (EAGLE-3)
) -> DraftTree:
    """Build the trees (see the module note)."""
    dev = root_logprobs.device
    bv = root_logprobs.shape[0]
    k = min(topk, root_logprobs.shape[1])
    ids_of = to_target or (lambda ids: ids)
    score, ids = root_logprobs.float().topk(k, dim=-1)  # [Bv, k]
    tokens = ids_of(ids)
    cand_score, cand_token, cand_parent = [score], [tokens], [torch.full_like(ids, -1)]
    cand_depth = [torch.ones(k, dtype=torch.int64, device=dev)]
    frontier = torch.arange(k, device=dev).expand(bv, k)  # candidate index of each frontier node
    origin = torch.zeros(bv, k, dtype=torch.int64, device=dev)
    offset = k
    for depth in range(1, num_steps):
        lp = expand(depth, tokens, origin).float()  # [Bv, k, V]
        child_score, child_ids = lp.topk(k, dim=-1)  # [Bv, k, k]
        child_score = (score[:, :, None] + child_score).view(bv, k * k)
        child_tokens = ids_of(child_ids).view(bv, k * k)
        cand_score.append(child_score)
        cand_token.append(child_tokens)
        cand_parent.append(frontier.repeat_interleave(k, dim=1))
        cand_depth.append(torch.full((k * k,), depth + 1, dtype=torch.int64, device=dev))
        score, best = child_score.topk(k, dim=-1)  # [Bv, k] the next frontier
        tokens = child_tokens.gather(1, best)
        origin = best // k
        frontier = offset + best
        offset += k * k
    scores = torch.cat(cand_score, dim=1).clamp(min=torch.finfo(torch.float32).min)  # [Bv, C]; -inf: not kept
    depth_of = torch.cat(cand_depth)  # [C]
    limit = to_device(np.minimum(sizes, num_steps), dev)  # a tree of n nodes is at most n deep
    scores = scores.masked_fill(depth_of[None, :] > limit[:, None], float("-inf"))
    n = int(sizes.max())
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :n]  # [Bv, N] parents first
    row_of = torch.zeros(bv, scores.shape[1] + 1, dtype=torch.int64, device=dev)  # candidate + 1 -> chunk row
    row_of.scatter_(1, order + 1, torch.arange(1, n + 1, device=dev).expand(bv, n).contiguous())
    parent_cand = torch.cat(cand_parent, dim=1).gather(1, order)  # [Bv, N], -1: the root
    parents = row_of.gather(1, parent_cand + 1)
    depths = torch.cat([torch.zeros(bv, 1, dtype=torch.int64, device=dev), depth_of[order]], dim=1)
    return DraftTree(torch.cat(cand_token, dim=1).gather(1, order), parents, depths, sizes)


def place_tree(input_ids: torch.Tensor, tree: DraftTree, starts: np.ndarray) -> torch.Tensor:
    """``input_ids`` [T] with each verify entry's nodes after its first token (``starts`` [Bv])."""
    dev = input_ids.device
    sizes = tree.sizes
    cols = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    ids = input_ids.clone()
    ids[to_device(np.repeat(starts, sizes) + 1 + cols, dev)] = tree.tokens[
        to_device(owner, dev), to_device(cols, dev)
    ]
    return ids


def ancestor_masks(tree: DraftTree) -> torch.Tensor:
    """[Bv, N + 1, N + 1] bool: row ``i`` sees row ``j`` iff ``j`` is ``i`` or one of its ancestors."""
    bv, n = tree.parents.shape
    dev = tree.parents.device
    parent = torch.cat(
        [torch.zeros(bv, 1, dtype=torch.int64, device=dev), tree.parents], dim=1
    )  # root: itself
    mask = torch.eye(n + 1, dtype=torch.bool, device=dev).expand(bv, n + 1, n + 1).clone()
    up = torch.arange(n + 1, device=dev).expand(bv, n + 1)
    for _ in range(int(tree.depths.max())):  # each pass adds one generation of ancestors
        up = parent.gather(1, up)
        mask.scatter_(2, up[:, :, None], True)
    return mask


def tree_mask(
    tree: DraftTree, verify: np.ndarray, batch_size: int, masks: torch.Tensor | None = None
) -> TreeMask:
    """The attention mask of a step whose entries ``verify`` ([Bv]) verify ``tree`` (chunks of ``sizes + 1``);
    ``masks``: the tree's :func:`ancestor_masks`, where the caller has them."""
    if masks is None:
        masks = ancestor_masks(tree)
    rows = tree.sizes + 1  # [Bv]
    flat = torch.cat([masks[b, :r, :r].reshape(-1) for b, r in enumerate(rows.tolist())])
    offsets = np.full(batch_size, -1, dtype=np.int64)
    offsets[verify] = np.cumsum(rows * rows) - rows * rows
    return TreeMask(flat, offsets)


def tree_positions(
    positions: torch.Tensor, tree: DraftTree, starts: np.ndarray, prefix: np.ndarray
) -> torch.Tensor:
    """``positions`` [T] with each verify entry's rows at ``P + depth`` (``starts``, ``prefix``: [Bv], the
    entries' first token row and ``P``)."""
    dev = positions.device
    rows = tree.sizes + 1
    idx = np.repeat(starts, rows) + np.arange(int(rows.sum())) - np.repeat(np.cumsum(rows) - rows, rows)
    owner = np.repeat(np.arange(len(rows)), rows)
    col = idx - np.repeat(starts, rows)
    out = positions.clone()
    depth = tree.depths[to_device(owner, dev), to_device(col, dev)]
    out[to_device(idx, dev)] = to_device(np.repeat(prefix, rows), dev) + depth
    return out


class BranchRows:
    """Private request-table rows of the branches of a draft search (see the module note): row ``b * k + f`` is
    branch ``f`` of verify entry ``b``."""

    def __init__(
        self,
        table: torch.Tensor,  # [max_reqs, context] the shared request table
        reqs: np.ndarray,  # [Bv] request slots
        prefix: np.ndarray,  # [Bv] P: the position of each entry's newest token (its KV already drafted)
        topk: int,
        num_steps: int,
        scratch: int,  # first scratch slot of the draft's pool
    ) -> None:
        self.k, self.prefix, self.scratch = topk, prefix, scratch
        dev = table.device
        width = min(
            int(prefix.max()) + num_steps, table.shape[1]
        )  # positions the passes write: <= P + steps - 1
        self.rows = table[to_device(reqs, dev), :width].repeat_interleave(topk, dim=0)  # [Bv * k, W]
        self.row_ids = torch.arange(len(reqs) * topk, device=dev)

    def advance(self, depth: int, origin: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The rows of the nodes at ``depth`` (node f of entry b a child of row ``origin[b, f]`` of the previous
        depth): (their positions ``P + depth`` [Bv * k], their scratch slots [Bv * k])."""
        bv, k = origin.shape
        if self.rows.shape[1] <= int(self.prefix.max()) + depth:
            raise RuntimeError("a draft branch outgrew its table rows")
        rows = self.rows.view(bv, k, -1)
        self.rows = rows.gather(1, origin[:, :, None].expand(-1, -1, rows.shape[2])).view(bv * k, -1)
        positions = np.repeat(self.prefix, k) + depth
        slots = self.scratch + (depth - 1) * bv * k + self.row_ids
        self.rows[self.row_ids, to_device(positions, self.rows.device)] = slots
        return positions, slots


def scratch_slots(max_reqs: int, topk: int, num_steps: int) -> int:
    """Scratch slots a draft pool needs past the target's for the branches of one step's searches."""
    return max_reqs * topk * max(num_steps - 1, 0)


class TreeVerified(NamedTuple):
    path: torch.Tensor  # [Bv, D + 1] chunk rows of the accepted path (root first; past m: repeats)
    accepted: torch.Tensor  # [Bv] accepted nodes m
    tokens: torch.Tensor  # [Bv, D + 1] emitted tokens (the first m + 1 are real)


def accept_tree(target_tokens: torch.Tensor, tree: DraftTree) -> TreeVerified:
    """Walk each tree from its root (see the module note). ``target_tokens`` [Bv, N + 1]: the target's token at
    each chunk row (padding rows past a tree's size are never reached)."""
    bv, n = tree.parents.shape
    dev = tree.parents.device
    valid = torch.arange(1, n + 1, device=dev)[None, :] <= to_device(tree.sizes, dev)[:, None]  # [Bv, N]
    steps = int(tree.depths.max())
    cur = torch.zeros(bv, dtype=torch.int64, device=dev)
    alive = torch.ones(bv, dtype=torch.bool, device=dev)
    path, emitted = [cur], [target_tokens[:, 0]]
    for _ in range(steps):
        t = target_tokens.gather(1, cur[:, None])  # [Bv, 1]
        hit = (tree.parents == cur[:, None]) & (tree.tokens == t) & valid  # [Bv, N]; at most one per row
        alive = alive & hit.any(dim=1)
        cur = torch.where(alive, hit.to(torch.int64).argmax(dim=1) + 1, cur)
        path.append(cur)
        emitted.append(target_tokens.gather(1, cur[:, None]).squeeze(1))
    path_t = torch.stack(path, dim=1)  # [Bv, D + 1]
    accepted = (path_t[:, 1:] != path_t[:, :-1]).sum(dim=1)
    return TreeVerified(path_t, accepted, torch.stack(emitted, dim=1))


def pool_buffers(pool: Any, swa: bool = False) -> list[torch.Tensor]:
    """A KV pool's per-slot tensors of one slot space: every layer's K and V (``KVPool``) or latents
    (``MLAKVPool``); in hybrid pools (``KVPool.swa_layers``, ``mem_cache.hybrid_swa``) the full-attention layers'
    (indexed by full slot), or with ``swa`` the windowed layers' (indexed by SWA slot)."""
    latents = getattr(pool, "latent_buffers", None)
    if latents is not None:
        return [] if swa else list(latents)
    in_swa = pool.swa_layers
    return [
        b for bufs in (pool.k_buffers, pool.v_buffers) for b, w in zip(bufs, in_swa, strict=True) if w == swa
    ]


def move_path(
    buffers: list[torch.Tensor], chunk_slots: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor
) -> None:
    """Copy each buffer's rows (KV, hidden states, tokens: indexed by slot) of the accepted path's nodes to the
    slots of the chunk's first rows. ``chunk_slots`` [Bv, N + 1]: the KV slot of each chunk row."""
    depth = path.shape[1]
    col = torch.arange(depth, device=path.device)[None, :].expand_as(path)
    move = (col <= accepted[:, None]) & (path != col)  # [Bv, D + 1]
    src = chunk_slots.gather(1, path)[move]
    dst = chunk_slots[:, :depth][move]
    if src.numel() == 0:
        return
    for buf in buffers:
        if buf.element_size() == 1 and buf.is_floating_point():  # FP8: copied as bytes
            buf = buf.view(torch.uint8)
        buf[dst] = buf[src]  # gathered before written: no copy reads a slot another one writes
