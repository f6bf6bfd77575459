"""Test oracle: log-probs of token-id lists, built with plain per-row Python (not recpipe's collate).

The package computes log-probs from collate's tensors (``recpipe.models.logprobs.response_logprobs``);
this builds the same tensors row by row from lists, so tests can check the trainer and the samplers
against an independent padding/position layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recpipe.models.logprobs import response_logprobs


def recompute_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float,
    top_p: float = 1.0,
    pad_token_id: int = 0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each response token given its prompt, in one right-padded forward pass.

    Differentiable: wrap in ``torch.no_grad()`` when only values are needed.

    Args:
        model: A transformers causal LM (get_decoder / get_output_embeddings).
        prompt_ids: B prompts, token ids exactly as the generator saw them.
        response_ids: B responses (may be empty).
        temperature: Sampling temperature of the behaviour policy (> 0).
        top_p: Nucleus mass used when sampling (1.0 = off).
        pad_token_id: Filler id for padding (never attended to: right padding, causal model).
        chunk_tokens: LM-head rows at a time (see ``sampled_token_logprobs``).

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
    max_resp = max((len(r) for r in response_ids), default=0)
    if batch == 0 or max_resp == 0:
        empty = torch.zeros(batch, max_resp, device=device)
        return empty, empty.clone()
    # The last response token is only ever a target, never an input.
    width = max(len(p) + len(r) - 1 if r else len(p) for p, r in zip(prompt_ids, response_ids, strict=True))
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.bool)
    mask = torch.zeros(batch, max_resp, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        seq = list(p) + list(r)[:-1]
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        # Response token j sits at len(p) + j and is predicted by the hidden state one position earlier.
        positions[b, len(p) - 1 : len(p) - 1 + len(r)] = True
        mask[b, : len(r)] = True
    targets = torch.tensor([t for r in response_ids for t in r], dtype=torch.long)
    tensors = {"input_ids": input_ids, "positions": positions, "targets": targets, "response_mask": mask,
               "temperature": torch.full(targets.shape, float(temperature)),
               "top_p": torch.full(targets.shape, float(top_p))}
    logp, _ = response_logprobs(model, {k: v.to(device) for k, v in tensors.items()}, chunk_tokens)
    return logp, mask.to(device).float()
