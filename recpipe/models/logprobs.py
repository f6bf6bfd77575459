"""Per-token log-probs of response tokens under the temperature-scaled policy.

The generator records the log-prob of each sampled token under the distribution
it sampled from (logits / temperature, then top-p); the trainer must compute
the same quantity with the current weights for the importance ratio
exp(l - l_old) to mean anything. Both use the functions here.

    >>> logp, mask = recompute_logprobs(model, [[1, 5, 9]], [[7, 2]], temperature=0.7)  # doctest: +SKIP
    >>> logp.shape                                    # (B, R): one row per sequence
    torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the nucleus to -inf, exactly as vLLM's sampler does.

    Sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p,
    always keep the most likely one. Works on (..., V); returns a new tensor.
    """
    if top_p >= 1.0:
        return logits
    with torch.no_grad():  # the mask is a constant; gradients flow through the kept logits only
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False  # at least one token survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, top_p: float = 1.0
) -> torch.Tensor:
    """log softmax(top_p(logits / temperature))[target]; temperature 0 means greedy (raw log-probs).

    logits (..., V), targets (...) -> (...), float32.
    """
    logits = logits.float()
    if temperature > 0:
        logits = apply_top_p(logits / temperature, top_p)
    return logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def recompute_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float,
    top_p: float = 1.0,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each response token given its prompt, in one right-padded forward pass.

    Differentiable: wrap in ``torch.no_grad()`` when only values are needed.

    Args:
        model: A transformers causal LM (takes input_ids, attention_mask, logits_to_keep).
        prompt_ids: B prompts, token ids exactly as the generator saw them.
        response_ids: B responses (may be empty).
        temperature: Sampling temperature of the behaviour policy (> 0).
        top_p: Nucleus mass used when sampling (1.0 = off).
        pad_token_id: Filler id for padding (masked out, any valid id works).

    Returns:
        (logprobs, mask), both (B, R) with R the longest response; float32 log-probs
        (0 at padding) and a float mask with 1 on response tokens.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows but response_ids has {len(response_ids)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (log-probs of the sampling distribution)")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    device = next(model.parameters()).device
    batch = len(prompt_ids)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids])
    response_lens = torch.tensor([len(r) for r in response_ids])
    max_resp = int(response_lens.max()) if batch else 0
    if batch == 0 or max_resp == 0:
        empty = torch.zeros(batch, max_resp, device=device)
        return empty, empty.clone()
    total = int((prompt_lens + response_lens).max())

    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, total, dtype=torch.long)
    targets = torch.full((batch, max_resp), pad_token_id, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        seq = list(p) + list(r)
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        targets[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    mask = (torch.arange(max_resp)[None, :] < response_lens[:, None]).float()

    # Response token j of row b sits at prompt_len_b + j and is predicted by the logits one position
    # earlier. Only positions from the shortest prompt on are needed: logits_to_keep skips the rest of
    # the (B, T, V) tensor, the biggest allocation here.
    first = int(prompt_lens.min()) - 1
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=total - first
    )
    logits = out.logits  # (B, total - first, V)
    positions = (prompt_lens[:, None] - 1 - first + torch.arange(max_resp)[None, :]).clamp(
        max=logits.shape[1] - 1
    )
    picked = logits.gather(1, positions.to(device)[..., None].expand(-1, -1, logits.shape[-1]))  # (B, R, V)
    logp = token_logprobs(picked, targets.to(device), temperature, top_p)
    mask = mask.to(device)
    return logp * mask, mask
