"""A tiny random Llama with a locally trained tokenizer, for tests and smoke runs.

No hub access exists here, so the test model is built from scratch: a byte-level
BPE tokenizer trained on a few arithmetic and English strings (byte fallback: any
text encodes) and a 2-layer LlamaForCausalLM, saved as a normal float32
safetensors checkpoint that transformers and vLLM (CPU) both load.

    >>> from recpipe.models import build_tiny_model
    >>> path = build_tiny_model("/tmp/tiny")          # doctest: +SKIP
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ChatML, as SmolLM2-Instruct uses: the same template code path for tests and the default model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 like SmolLM2
VOCAB_SIZE = 512  # byte alphabet (256) + specials + ~250 merges


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [
        "what",
        "is",
        "the",
        "answer",
        "with",
        "just",
        "number",
        "sum",
        "of",
        "and",
        "plus",
        "minus",
        "times",
        "equals",
        "a",
        "so",
        "system",
        "user",
        "assistant",
        "you",
        "are",
        "helpful",
        "please",
        "compute",
        "question",
        "solve",
        "step",
    ]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    lines = []
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"What is {a} {op} {b}? Answer with just the number. {a} {op} {b} = {ops[op](a, b)}")
        lines.append(" ".join(rng.choice(words) for _ in range(8)))
    return lines


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials; deterministic for a seed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # SmolLM2 pads with <|im_end|> too
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def tiny_config(vocab_size: int, eos_id: int, bos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention needs head_dim >= 64
        max_position_embeddings=512,
        initializer_range=0.2,  # larger than usual so the random model's distributions are not flat
        tie_word_embeddings=True,  # as SmolLM2: exercises the same weight-loading path
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        torch_dtype="float32",
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer to ``out_dir``; same seed, same bytes.

    Args:
        out_dir: Directory to write (created; existing files are overwritten).
        seed: Seeds the tokenizer corpus and the weights.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config = tiny_config(len(tokenizer), eos_id, bos_id)
    # fork_rng: seed the weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
