"""Batches for trainer tests: random ones (any token ids) and ones sampled from the model itself.

Both have the columns recpipe.select's Batch.rollouts carries, built directly as an Arrow table so
the trainer tests do not depend on the select stage.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pyarrow as pa
import torch

from recpipe.algorithms import LossConfig
from tests.algorithms.oracle_advantages import batch_group_advantages


def batch_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([
        ("rollout_id", pa.string()), ("group_id", pa.string()), ("policy_version", pa.int32()),
        ("advantage", pa.float64()), ("weight", pa.float64()), ("kept", pa.bool_()),
        ("prompt_token_ids", pa.list_(pa.int32())), ("response_token_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float32())), ("reward", pa.float64()), ("temperature", pa.float64()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def _rows(prompts, responses, logprobs, rewards, cfg, policy_version, temperature, seed, weight=1.0):
    """Group-relative advantages (as select computes them) + one row per response."""
    advantages, kept = batch_group_advantages(rewards, cfg, seed=seed)
    rows = []
    for g, prompt in enumerate(prompts):
        for i, response in enumerate(responses[g]):
            rows.append(dict(
                rollout_id=f"s{seed}/g{g}/{i}", group_id=f"s{seed}/g{g}", policy_version=policy_version,
                advantage=advantages[g][i], weight=weight, kept=kept[g][i], prompt_token_ids=prompt,
                response_token_ids=response, behaviour_logprobs=logprobs[g][i], reward=rewards[g][i],
                temperature=temperature,
            ))
    return batch_table(rows)


def random_batch(seed: int, cfg: LossConfig, *, groups: int = 2, group_size: int = 4, vocab: int = 512,
                 prompt_len: tuple[int, int] = (3, 8), response_len: tuple[int, int] = (1, 12),
                 policy_version: int = 0, temperature: float = 1.0) -> pa.Table:
    """Random prompts/responses/log-probs, random 0/1 rewards with variance in every group."""
    rng = random.Random(seed)
    prompts, responses, logprobs, rewards = [], [], [], []
    for _ in range(groups):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))])
        lengths = [rng.randint(*response_len) for _ in range(group_size)]
        responses.append([[rng.randrange(3, vocab) for _ in range(n)] for n in lengths])
        logprobs.append([[-rng.uniform(4.0, 8.0) for _ in range(n)] for n in lengths])
        r = [float(rng.random() < 0.5) for _ in range(group_size)]
        r[0], r[1] = 1.0, 0.0  # never a zero-variance group
        rewards.append(r)
    return _rows(prompts, responses, logprobs, rewards, cfg, policy_version, temperature, seed)


@torch.no_grad()
def sample_responses(model: torch.nn.Module, prompt: list[int], n: int, max_new_tokens: int, temperature: float,
                     generator: torch.Generator, eos_id: int) -> tuple[list[list[int]], list[list[float]]]:
    """Plain ancestral sampling from softmax(logits / T); returns tokens and their log-probs (up to EOS)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt] * n)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1].float() / temperature
        logp = logits.log_softmax(-1)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)  # (n, 1)
        tokens.append(tok[:, 0])
        logps.append(logp.gather(-1, tok)[:, 0])
        ids = torch.cat([ids, tok], dim=1)
    model.train(was_training)
    out_tokens, out_logps = [], []
    for row in range(n):
        t, lp = [], []
        for step in range(max_new_tokens):
            t.append(int(tokens[step][row]))
            lp.append(float(logps[step][row]))
            if t[-1] == eos_id:
                break
        out_tokens.append(t)
        out_logps.append(lp)
    return out_tokens, out_logps


def sampled_batch(model: torch.nn.Module, prompts: list[list[int]], cfg: LossConfig, *, group_size: int,
                  max_new_tokens: int, temperature: float, seed: int, eos_id: int,
                  reward: Callable[[list[int]], float], policy_version: int = 0) -> pa.Table:
    """K responses per prompt sampled from ``model`` with their behaviour log-probs, scored by ``reward``."""
    generator = torch.Generator().manual_seed(seed)
    responses, logprobs, rewards = [], [], []
    for prompt in prompts:
        t, lp = sample_responses(model, prompt, group_size, max_new_tokens, temperature, generator, eos_id)
        responses.append(t)
        logprobs.append(lp)
        rewards.append([reward(x) for x in t])
    return _rows(prompts, responses, logprobs, rewards, cfg, policy_version, temperature, seed)
