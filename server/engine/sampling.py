"""Picking the next token for a whole batch at once, each row with its own temperature/top_p.

Nucleus (top-p) sampling needs the most likely tokens sorted by probability; sorting the full
49k-token vocabulary for every row of every step costs more than the rest of sampling, so the
top `FAST_TOP_K` tokens are taken first and the nucleus is exact whenever it lies inside them
(nearly always at chat temperatures); rows whose nucleus is wider fall back to a full sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FAST_TOP_K = 256


def sample_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generator: torch.Generator | None = None,
) -> list[int]:
    """One token id per row of `logits` [n, vocab]. Temperature 0 is greedy (argmax)."""
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        temperature = torch.tensor([temperatures[i] for i in sampled_rows], device=logits.device)
        top_p = torch.tensor([top_ps[i] for i in sampled_rows], device=logits.device)
        probs = torch.softmax(logits.index_select(0, index).float() / temperature[:, None], dim=-1)
        chosen[index] = _nucleus_sample(probs, top_p, generator)
    return chosen.tolist()


def _nucleus_sample(probs: torch.Tensor, top_p: torch.Tensor, generator) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose mass reaches top_p (per row)."""
    k = min(FAST_TOP_K, probs.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)  # sorted, most likely first
    covered = top_probs.sum(dim=-1) >= top_p
    if not bool(covered.all()):
        wide = (~covered).nonzero().flatten()
        full_probs, full_ids = probs.index_select(0, wide).sort(dim=-1, descending=True)
        result = torch.empty(len(probs), dtype=torch.long, device=probs.device)
        result[wide] = _sample_sorted(full_probs, full_ids, top_p[wide], generator)
        narrow = covered.nonzero().flatten()
        if len(narrow):
            result[narrow] = _sample_sorted(top_probs[narrow], top_ids[narrow], top_p[narrow], generator)
        return result
    return _sample_sorted(top_probs, top_ids, top_p, generator)


def _sample_sorted(sorted_probs, sorted_ids, top_p, generator) -> torch.Tensor:
    # Keep a token while the mass before it is under top_p: the token that crosses the
    # threshold is kept, and the most likely token always is.
    # (Explicitly: a top_p that rounds to 0 in float32 would otherwise keep nothing.)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = mass_before < top_p[:, None]
    keep[:, 0] = True
    weights = sorted_probs * keep
    pick = torch.multinomial(weights, 1, generator=generator)
    return sorted_ids.gather(-1, pick).squeeze(-1)
