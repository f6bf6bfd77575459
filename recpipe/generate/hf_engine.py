"""transformers sampling backend: the fallback where vLLM is absent, and the parity reference.

A plain decoding loop (not `model.generate`) so that what is sampled and what is
recorded are visibly the same thing: each step takes the last logits in float32,
divides by the temperature, applies top-p exactly as vLLM does (no top-k: HF's
default top_k=50 would sample from a different distribution than vLLM), samples
from that distribution and records the sampled token's log-prob under it.
Prompts are left-padded so that every row's next token sits in the last column,
and the KV cache carries the prefix. Each step reads one thing back to the host (whether
every row has ended; with stop strings, the new tokens), and a stop string is looked for in
the text of each row's last few tokens only (``_StopStrings``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from recpipe.generate.engine import Engine, EngineError, Sample, SamplingArgs
from recpipe.models.logprobs import apply_top_p


class HFEngine(Engine):
    """Batched sampling with transformers and a KV cache."""

    backend = "hf"

    def __init__(self, checkpoint: str | Path, *, model_name: str, seed: int = 0, max_model_len: int = 512,
                 dtype: str = "float32", device: str = "auto", max_batch_size: int = 64) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"device={device!r}: expected one of ['auto', 'cpu', 'cuda']")
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size={max_batch_size!r}: expected an int >= 1")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        super().__init__(checkpoint, model_name, max_model_len)
        self.max_batch_size = max_batch_size  # rows (prompt x sample) decoded together
        self.seed = seed
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=self.dtype).to(self.device).eval()
        # Stop on the generation config's EOS ids and the tokenizer's, as vLLM does.
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise EngineError(
                f"checkpoint={str(checkpoint)!r}: neither generation_config nor tokenizer names an EOS token"
            )
        self.eos_ids = torch.tensor(sorted(eos_ids), device=self.device)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else int(self.eos_ids[0])

    def load_weights(self, checkpoint: str | Path) -> None:
        """Copy a new checkpoint's weights (same architecture) into the loaded model."""
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        fresh = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=self.dtype)
        self.model.load_state_dict(fresh.state_dict())
        self.checkpoint = Path(checkpoint)
        self.last_load_seconds = time.perf_counter() - start

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], args: SamplingArgs) -> list[Sample]:
        generator = torch.Generator(device=self.device)
        if args.seed is None:
            generator.seed()
        else:
            generator.manual_seed(args.seed)
        rows = [ids for ids in prompts for _ in range(args.n)]  # prompt i's samples are adjacent
        samples: list[Sample] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            samples += self._decode(chunk, args.temperature, args.top_p, args.max_tokens, args.stop, generator)
        return samples

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and position_ids (B, W) of left-padded prompts, on the device."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: the last column is every row's newest token
            input_ids[b, width - len(p) :] = torch.tensor(p)
            attention_mask[b, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def _next_token(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One decoding step: each row's next token (B,), its log-prob under the sampler (B,), the KV cache."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            logp = logits.log_softmax(-1)
            next_ids = logits.argmax(-1)
        else:
            logp = apply_top_p(logits / temperature, top_p).log_softmax(-1)
            next_ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        return next_ids, logp.gather(-1, next_ids[:, None]).squeeze(-1), out.past_key_values

    def _decode(
        self,
        prompts: list[list[int]],
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: list[str],
        generator: torch.Generator,
    ) -> list[Sample]:
        batch = len(prompts)
        input_ids, attention_mask, position_ids = self._left_padded(prompts)
        tokens = torch.zeros(batch, max_tokens, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(batch, max_tokens, device=self.device)
        # The step of each row's first EOS (max_tokens: none yet), kept on the device: no per-row host reads.
        first_eos = torch.full((batch,), max_tokens, dtype=torch.long, device=self.device)
        stops = _StopStrings(self.tokenizer, stop, batch) if stop else None
        past = None
        for step in range(max_tokens):
            next_ids, next_logp, past = self._next_token(input_ids, attention_mask, position_ids, past,
                                                         temperature, top_p, generator)
            tokens[:, step] = next_ids
            logprobs[:, step] = next_logp
            first_eos = torch.where(torch.isin(next_ids, self.eos_ids) & (first_eos == max_tokens), step, first_eos)
            # One host read per step, for stopping early (the generator's stream must not see extra steps).
            if stops is not None:
                ids, ended = torch.stack([next_ids, (first_eos < max_tokens).long()]).tolist()
                done = stops.step(step, ids, ended)
            else:
                done = bool((first_eos < max_tokens).all())
            if done:
                break
            # Finished rows keep decoding (their extra tokens are ignored): simpler than shrinking the cache.
            input_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1

        # A row ends at its first EOS, or where a stop string completed (an EOS never completes one), or at
        # max_tokens; the token that ended it is kept.
        ends = first_eos.tolist()
        cut: dict[int, tuple[int, str]] = stops.found if stops is not None else {}
        tokens_host, logprobs_host = tokens.tolist(), logprobs.tolist()
        samples = []
        for b in range(batch):
            end = min(ends[b], cut[b][0] if b in cut else max_tokens)
            ids = tokens_host[b][: min(end + 1, max_tokens)]
            if b in cut and cut[b][0] < ends[b]:
                text, reason = cut[b][1], "stop"
            else:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                reason = "stop" if end < max_tokens else "length"
            samples.append(Sample(ids, logprobs_host[b][: len(ids)], text, reason))
        return samples

    def close(self) -> None:
        self.model = None


class _StopStrings:
    """Finds, token by token, where each row's text first contains a stop string.

    Decoding a row's whole prefix at every step costs O(T^2); a stop string that the newest token
    completes lies within the text of the last few tokens, so only those are decoded: enough non-special
    tokens (special ones decode to nothing) to hold the longest stop string with every character split
    into 4 byte-level tokens, plus a margin for a window edge that falls inside a character. A hit there
    is confirmed on the whole text (decoded once), which also gives where to cut it.
    """

    def __init__(self, tokenizer: Any, stop: list[str], batch: int) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.special = set(tokenizer.all_special_ids)
        self.window = 4 * max(len(s) for s in stop) + 8
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.plain: list[list[int]] = [[] for _ in range(batch)]  # positions of non-special tokens
        self.found: dict[int, tuple[int, str]] = {}  # row -> (step, text cut before the stop string)

    def step(self, step: int, next_ids: list[int], ended: list[int]) -> bool:
        """Add each row's newest token; True when every row has ended (EOS, or a stop string)."""
        for b, token in enumerate(next_ids):
            if b in self.found or ended[b]:
                continue  # an EOS ends the row before any stop string check, as in the loop's order
            ids = self.ids[b]
            ids.append(token)
            if token in self.special:
                continue  # decodes to nothing: the text did not change
            self.plain[b].append(len(ids) - 1)
            start = self.plain[b][-self.window] if len(self.plain[b]) >= self.window else 0
            tail = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
            if not any(s in tail for s in self.stop):
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:  # like vLLM: keep the token that completed the stop string, cut the text
                self.found[b] = (step, text[:cut])
        return all(b in self.found or ended[b] for b in range(len(next_ids)))
