"""Log-probs of response tokens under the current weights, at the sampler's temperature.

    logp, entropy_sum = response_logprobs(model, tensors)   # tensors from batching.collate
    # logp (B, R) with a gradient, 0 on padding; entropy_sum: summed over response tokens

The behaviour log-probs were recorded under softmax(top_p(logits / T)); the importance
ratio exp(l - l_old) only means something if l is the same quantity, so each token is
scaled by the temperature (and nucleus) of the row it belongs to.

Only the hidden states at response positions go through the LM head: the (tokens, vocab)
logits are the largest tensor of a step (49k vocab for SmolLM2), and prompt positions
never need them. This assumes the usual causal-LM layout, logits = lm_head(decoder(x))
(Llama, Qwen, Mistral, SmolLM2; not models with logit soft-capping or scaling).
"""

from __future__ import annotations

import torch

from recpipe.models import apply_top_p


def _sampling_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (N, V) / T per row, then the nucleus of each row's top_p (usually one value per batch)."""
    logits = logits / temperature[:, None]
    if bool((top_p < 1).any()):
        for p in top_p.unique().tolist():
            if p < 1:
                rows = top_p == p
                logits = torch.where(rows[:, None], apply_top_p(logits, p), logits)
    return logits


def response_logprobs(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (B, R), entropy summed over the micro-batch's response tokens (scalar, no gradient)).

    Runs under whatever autocast the caller set for the decoder; the LM head and the softmax run in
    float32, because bf16 logits would round log-prob differences near 0 and make rho noisy.
    """
    hidden = model.get_decoder()(input_ids=tensors["input_ids"]).last_hidden_state  # (B, W, H)
    h = hidden[tensors["positions"]]  # (N, H), row-major: the order of tensors["targets"]
    head = model.get_output_embeddings()
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = head(h.float())  # (N, V) float32
        logits = _sampling_logits(logits, tensors["temperature"], tensors["top_p"])
        logp_all = logits.log_softmax(dim=-1)  # (N, V)
        token_logp = logp_all.gather(-1, tensors["targets"][:, None]).squeeze(-1)  # (N,)
        with torch.no_grad():
            entropy_sum = torch.special.entr(logp_all.exp()).sum()  # entr(0) = 0: -inf logits are fine
    mask = tensors["response_mask"]
    logp = token_logp.new_zeros(mask.shape).masked_scatter(mask, token_logp)  # (B, R), 0 on padding
    return logp, entropy_sum
