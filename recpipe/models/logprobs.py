"""Per-token log-probs of response tokens under the temperature-scaled policy: the one implementation.

The generator records the log-prob of each sampled token under the distribution it sampled from
(softmax(top_p(logits / T))); the trainer must compute the same quantity with the current weights for
the importance ratio exp(l - l_old) to mean anything. The trainer (``response_logprobs`` on the
tensors of ``recpipe.train.batching.collate``) and the transformers sampler (``apply_top_p``) go through
the functions here.

    logp, entropy_sum = response_logprobs(model, tensors, chunk_tokens=1024)

Memory: only the hidden states at response positions go through the LM head, and they go through it
``chunk_tokens`` rows at a time under activation checkpointing: the (tokens, vocab) float32 logits
never exist whole (16k tokens of a 151k-vocab Qwen model would be 9.9 GB per copy, and the unchunked
backward keeps several copies). Backward recomputes one chunk's logits at a time. Values and gradients
equal the unchunked path up to float summation order (tests/models/test_recompute_logprobs.py, with
the token-list oracle tests/models/reference_logprobs.py).
This assumes the usual causal-LM layout, logits = lm_head(decoder(x)) (Llama, Qwen, Mistral, SmolLM2;
not models with logit soft-capping or scaling).

Imports torch only (no store, no config): the GPU benchmark runs where only torch + transformers are.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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


def _sampling_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (N, V) / T per row, then the nucleus of each row's top_p (usually one value per batch)."""
    logits = logits / temperature[:, None]
    if bool((top_p < 1).any()):
        for p in top_p.unique().tolist():
            if p < 1:
                rows = top_p == p
                logits = torch.where(rows[:, None], apply_top_p(logits, p), logits)
    return logits


def _chunk(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor,
           top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target (n,), summed entropy (no gradient)) for n rows of hidden states."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        # float32 head and softmax: bf16 logits would round log-prob differences near 0 and make rho noisy.
        bias = None if head.bias is None else head.bias.float()
        logits = torch.nn.functional.linear(h.float(), head.weight.float(), bias)  # (n, V)
        logp_all = _sampling_logits(logits, temperature, top_p).log_softmax(dim=-1)  # (n, V)
        token_logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
        with torch.no_grad():
            entropy = torch.special.entr(logp_all.exp()).sum()  # entr(0) = 0: -inf logits are fine
    return token_logp, entropy


def sampled_token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: torch.Tensor, top_p: torch.Tensor, chunk_tokens: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(top_p(head(hidden) / T))[target] per row, and the rows' summed entropy.

    hidden (N, H) at the positions that predict ``targets`` (N,); temperature, top_p (N,) per row.
    chunk_tokens: rows per LM-head chunk (None or 0: all at once, the whole (N, V) logits kept for
    backward). Returns (token_logp (N,) float32 with a gradient, entropy_sum scalar without).
    """
    if not chunk_tokens:
        return _chunk(head, hidden, targets, temperature, top_p)
    parts, entropy = [], hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        args = (head, hidden[rows], targets[rows], temperature[rows], top_p[rows])
        if torch.is_grad_enabled():
            # Keep only the chunk's inputs for backward; its logits are recomputed there, one chunk at a time.
            logp, ent = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            logp, ent = _chunk(*args)
        parts.append(logp)
        entropy = entropy + ent
    return torch.cat(parts), entropy


def response_logprobs(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                      chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (B, R), entropy summed over the micro-batch's response tokens (scalar, no gradient)).

    tensors: from ``recpipe.train.batching.collate`` (input_ids, positions, targets, temperature, top_p,
    response_mask). The decoder runs under whatever precision the caller set; the LM head and the
    softmax run in float32.
    """
    hidden = model.get_decoder()(input_ids=tensors["input_ids"]).last_hidden_state  # (B, W, H)
    h = hidden[tensors["positions"]]  # (N, H), row-major: the order of tensors["targets"]
    token_logp, entropy_sum = sampled_token_logprobs(model.get_output_embeddings(), h, tensors["targets"],
                                                     tensors["temperature"], tensors["top_p"], chunk_tokens)
    mask = tensors["response_mask"]
    logp = token_logp.new_zeros(mask.shape).masked_scatter(mask, token_logp)  # (B, R), 0 on padding
    return logp, entropy_sum

