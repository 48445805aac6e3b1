"""Rows added to a step's groups besides its fresh samples.

RePO replays past completions of the prompt, AR3PO adds further sampling stages and reuses a past
correct completion in an all-wrong group, LUFFY / AMPO add a reference solution, ExPO a
self-explanation. Each arrives as its own small `RolloutBatch` (one row per entry, marked with its
`ROW_*` source) and is merged into the groups it belongs to; groups stay contiguous, so everything
downstream (estimators, filters, mini-batches) sees ordinary groups of varying size.
"""
from __future__ import annotations

import torch

from groupwise.types import RolloutBatch, ScoredGroups, Scores


def first_row_of_groups(group_id: torch.Tensor) -> torch.Tensor:
    """[num_groups] index of each group's first row."""
    gid = group_id.long()
    num = int(gid.max()) + 1 if gid.numel() else 0
    first = torch.full((num,), gid.numel(), dtype=torch.long, device=gid.device)
    return first.scatter_reduce(0, gid, torch.arange(gid.numel(), device=gid.device), reduce="amin")


def extra_rows(
    base: RolloutBatch,
    groups: list[int],
    completions: list[list[int]],
    logprobs: list[list[float]] | None,
    source: int,
    *,
    pad_id: int,
    texts: list[str],
    finished: list[bool] | None = None,
) -> RolloutBatch:
    """One row per entry: completion `completions[i]` under the prompt of `base`'s group `groups[i]`.

    Local group ids are 0…n−1 (one per row); `merge_into_groups` maps them onto `groups`.
    `logprobs` are the rows' behaviour log-probs (None: unknown, stored as 0 = probability 1).
    """
    n, device = len(groups), base.group_id.device
    rows = first_row_of_groups(base.group_id)[torch.tensor(groups, dtype=torch.long, device=device)]
    width = max([len(c) for c in completions] + [1])
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    lps = torch.zeros(n, width)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    for i, c in enumerate(completions):   # one copy per row (not per token)
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        if logprobs is not None:
            lps[i, : len(c)] = torch.tensor(logprobs[i], dtype=torch.float32)
    mask = (torch.arange(width) < lengths[:, None]).long()
    return RolloutBatch(
        prompts=[base.prompts[g] for g in groups],
        prompt_ids=base.prompt_ids[rows], prompt_mask=base.prompt_mask[rows],
        completion_ids=ids.to(device), completion_mask=mask.to(device), sampling_logprobs=lps.to(device),
        group_id=torch.arange(n, device=device),
        finished=torch.tensor(finished if finished is not None else [True] * n, dtype=torch.bool, device=base.finished.device),
        completions_text=list(texts), source=torch.full((n,), source, dtype=torch.long, device=device),
    )


def merge_into_groups(base: ScoredGroups, extra: ScoredGroups, target_groups: list[int], pad_id: int) -> tuple[ScoredGroups, torch.Tensor]:
    """`base` with `extra`'s row i appended to base group `target_groups[extra group of i]`.

    Returns the merged batch (base's prompts and group numbering; each group's base rows first, then
    its extra rows, in order) and the permutation `order` such that merged row j is row `order[j]` of
    the concatenation [base rows; extra rows] — for carrying per-row values along.
    """
    b, e = base.rollout, extra.rollout
    both = RolloutBatch.concatenate([b, e], pad_id)
    targets = torch.tensor(target_groups, dtype=torch.long, device=b.group_id.device)
    gid = torch.cat([b.group_id, targets[e.group_id]])
    order = torch.argsort(gid, stable=True)
    rollout = RolloutBatch(
        prompts=list(b.prompts), prompt_ids=both.prompt_ids[order], prompt_mask=both.prompt_mask[order],
        completion_ids=both.completion_ids[order], completion_mask=both.completion_mask[order],
        sampling_logprobs=both.sampling_logprobs[order], group_id=gid[order], finished=both.finished[order],
        completions_text=[both.completions_text[i] for i in order.tolist()], source=both.row_source[order],
    )
    s = base.scores
    values = torch.cat([s.values, extra.scores.values])[order.cpu()]
    errors = s.function_errors if extra.scores.function_errors is None or s.function_errors is None else \
        [a + c for a, c in zip(s.function_errors, extra.scores.function_errors)]
    scores = Scores(values, s.names, s.weights, s.num_errors + extra.scores.num_errors, errors)
    return ScoredGroups(rollout, scores), order


def unscored(rollout: RolloutBatch, like: Scores) -> Scores:
    """Scores of rows whose reward is known from elsewhere (replayed, reused): NaN for every function."""
    values = torch.full((rollout.num_completions, like.values.shape[1]), float("nan"), dtype=like.values.dtype)
    return Scores(values, like.names, like.weights, 0, [0] * len(like.names))
