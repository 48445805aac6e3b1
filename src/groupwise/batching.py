"""How a step's rows are cut into mini-batches (optimizer steps) and micro-batches (forward passes).

Groups may have different sizes (Knapsack budgets, replayed or guidance rows), so every cut is
computed from `group_id`; mini-batches always hold whole groups, micro-batches hold whole groups
when the surrogate compares a question's completions (DisCO).
"""
from __future__ import annotations

import torch


def group_sizes_of(group_id: torch.Tensor) -> list[int]:
    """Row count of each group 0…max (groups contiguous or not)."""
    if group_id.numel() == 0:
        return []
    return torch.bincount(group_id.long().cpu()).tolist()


def split_by_group(values: list, group_id: torch.Tensor) -> list[list]:
    """Per-row `values` as one list per group, in group order (rows of a group in row order)."""
    gid = group_id.long().cpu().tolist()
    out: list[list] = [[] for _ in range(max(gid) + 1 if gid else 0)]
    for g, v in zip(gid, values):
        out[g].append(v)
    return out


def mini_batch_rows(group_id: torch.Tensor, mini_batches: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """`mini_batches` lists of row indices holding whole groups, balanced by rows.

    Groups are taken in a random order when `generator` is given (else in order); group g goes to
    mini-batch ⌊start_g · M / N⌋ where start_g is its first row's offset in that order, so every
    mini-batch gets about N / M rows and none is split.
    """
    gid = group_id.long().cpu()
    sizes = torch.bincount(gid) if gid.numel() else torch.zeros(0, dtype=torch.long)
    num_groups = int(sizes.numel())
    order = torch.randperm(num_groups, generator=generator) if generator is not None else torch.arange(num_groups)
    n = int(gid.numel())
    starts = torch.cumsum(sizes[order], 0) - sizes[order]
    chunk = (starts * mini_batches) // max(n, 1)
    rows_of = [torch.nonzero(gid == g, as_tuple=True)[0] for g in range(num_groups)]   # one pass per group, not per token
    out = []
    for m in range(mini_batches):
        groups = order[chunk == m].tolist()
        if groups:
            out.append(torch.cat([rows_of[g] for g in groups]))
    return out


def micro_batch_rows(group_id: torch.Tensor, micro: int, whole_groups: bool) -> list[torch.Tensor]:
    """Row positions 0…n−1 cut into micro-batches of at most `micro` rows (whole groups: of whole
    groups, each micro-batch as full as possible without exceeding `micro` unless one group does)."""
    n = int(group_id.numel())
    if n == 0:   # (split() of an empty tensor would give one empty micro-batch)
        return []
    if not whole_groups:
        return list(torch.arange(n).split(max(micro, 1)))
    gid = group_id.long().cpu()
    boundaries = [0] + (torch.nonzero(gid[1:] != gid[:-1], as_tuple=True)[0] + 1).tolist() + [n]
    out, start = [], 0
    for b in range(1, len(boundaries)):
        end, nxt = boundaries[b], boundaries[b + 1] if b + 1 < len(boundaries) else None
        if nxt is None or nxt - start > micro:   # adding the next group would overflow the micro-batch
            out.append(torch.arange(start, end))
            start = end
    return [r for r in out if r.numel()]


def rank_rows(group_id: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Row positions 0…n−1 cut into `world_size` contiguous parts of whole groups, balanced by
    rows: the group (run of equal ids) starting at row s goes to rank ⌊s·W / n⌋. A part may be
    empty when there are fewer groups than ranks. Concatenated in rank order the parts give 0…n−1,
    so gathering the ranks' results in rank order restores the batch's own order."""
    n = int(group_id.numel())
    if n == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(world_size)]
    gid = group_id.long().cpu()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(gid[1:] != gid[:-1], as_tuple=True)[0] + 1])
    ends = torch.cat([starts[1:], torch.tensor([n])])
    owner = (starts * world_size) // n
    return [torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts[owner == r], ends[owner == r])])
            if bool((owner == r).any()) else torch.zeros(0, dtype=torch.long) for r in range(world_size)]


def rank_micro_batches(group_id: torch.Tensor, micro: int | None, whole_groups: bool, world_size: int, rank: int) -> list[torch.Tensor | None]:
    """Rank `rank`'s micro-batches of a mini-batch (positions in it): its `rank_rows` share cut by
    `micro_batch_rows` (None: the whole share in one pass), padded with None up to the largest count
    any rank has, so that every rank runs the same number of forward/backward passes."""
    per_rank = [[share[r] for r in micro_batch_rows(group_id[share.to(group_id.device)], micro or max(int(share.numel()), 1), whole_groups)]
                for share in rank_rows(group_id, world_size)]
    return per_rank[rank] + [None] * (max(len(p) for p in per_rank) - len(per_rank[rank]))


def rank_groups(group_sizes: list[int], world_size: int) -> list[list[int]]:
    """Group indices per rank, contiguous and balanced by rows (the groups of `rank_rows`)."""
    gid = torch.arange(len(group_sizes)).repeat_interleave(torch.tensor(group_sizes, dtype=torch.long))
    return [sorted(set(gid[rows].tolist())) for rows in rank_rows(gid, world_size)]
