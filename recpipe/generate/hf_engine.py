"""transformers sampling backend: the fallback where vLLM is absent, and the parity reference.

A plain decoding loop (not `model.generate`) so that what is sampled and what is
recorded are visibly the same thing: each step takes the last logits in float32,
divides by the temperature, applies top-p exactly as vLLM does (no top-k: HF's
default top_k=50 would sample from a different distribution than vLLM), samples
from that distribution and records the sampled token's log-prob under it.
Prompts are left-padded so that every row's next token sits in the last column,
and the KV cache carries the prefix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from recpipe.generate.engine import Sample, check_sampling_args
from recpipe.models.logprobs import apply_top_p


class HFEngine:
    """Batched sampling with transformers and a KV cache."""

    backend = "hf"

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        model_name: str,
        seed: int = 0,
        max_model_len: int = 512,
        dtype: str = "float32",
        device: str = "auto",
        max_batch_size: int = 64,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={device!r}: expected one of ['auto', 'cpu', 'cuda']")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r}: expected an int >= 1")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size  # rows (prompt x sample) decoded together
        self.seed = seed
        self.checkpoint = Path(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=self.dtype).to(self.device).eval()
        # Stop on the generation config's EOS ids and the tokenizer's, as vLLM does.
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(
                f"checkpoint={str(checkpoint)!r}: neither generation_config nor tokenizer names an EOS token"
            )
        self.eos_ids = torch.tensor(sorted(eos_ids), device=self.device)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else int(self.eos_ids[0])
        self.last_load_seconds: float | None = None

    def load_weights(self, checkpoint: str | Path) -> None:
        """Copy a new checkpoint's weights (same architecture) into the loaded model."""
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        fresh = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=self.dtype)
        self.model.load_state_dict(fresh.state_dict())
        self.checkpoint = Path(checkpoint)
        self.last_load_seconds = time.perf_counter() - start

    @torch.no_grad()
    def sample(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples per prompt; see recpipe.generate.engine.Sample. Same seed and batch, same samples."""
        check_sampling_args(prompts_token_ids, n, temperature, top_p, max_tokens, self.max_model_len)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        rows = [list(ids) for ids in prompts_token_ids for _ in range(n)]  # prompt i's samples are adjacent
        samples: list[Sample] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            samples += self._decode(chunk, temperature, top_p, max_tokens, list(stop or ()), generator)
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts_token_ids))]

    def _decode(
        self,
        prompts: list[list[int]],
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: list[str],
        generator: torch.Generator,
    ) -> list[Sample]:
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: the last column is every row's newest token
            input_ids[b, width - len(p) :] = torch.tensor(p)
            attention_mask[b, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        tokens = torch.zeros(batch, max_tokens, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(batch, max_tokens, device=self.device)
        lengths = [0] * batch
        reasons: list[str | None] = [None] * batch
        texts: list[str | None] = [None] * batch
        past = None
        for step in range(max_tokens):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                logp = logits.log_softmax(-1)
                next_ids = logits.argmax(-1)
            else:
                logp = apply_top_p(logits / temperature, top_p).log_softmax(-1)
                next_ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            tokens[:, step] = next_ids
            logprobs[:, step] = logp.gather(-1, next_ids[:, None]).squeeze(-1)
            is_eos = torch.isin(next_ids, self.eos_ids).tolist()
            for b in range(batch):
                if reasons[b] is not None:
                    continue
                lengths[b] = step + 1
                if is_eos[b]:
                    reasons[b] = "stop"
                elif stop:
                    text = self.tokenizer.decode(tokens[b, : step + 1].tolist(), skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:  # like vLLM: keep the token that completed the stop string, cut the text
                        reasons[b], texts[b] = "stop", text[:cut]
                if reasons[b] is None and step + 1 == max_tokens:
                    reasons[b] = "length"
            if all(r is not None for r in reasons):
                break
            # Finished rows keep decoding (their extra tokens are ignored): simpler than shrinking the cache.
            input_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1

        samples = []
        for b in range(batch):
            ids = tokens[b, : lengths[b]].tolist()
            text = texts[b] if texts[b] is not None else self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(ids, logprobs[b, : lengths[b]].tolist(), text, reasons[b]))
        return samples

    def close(self) -> None:
        self.model = None
