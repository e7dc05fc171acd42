"""Tiny tokenizers and models built in milliseconds, so that no test reaches a model hub.

`byte_level_tokenizer()` is GPT-2 / Llama-3 style (leading-space tokens "Ġword", no BOS);
`sentencepiece_tokenizer()` is Llama-2 style (Metaspace "▁word" tokens, BOS prepended).
`tiny_llama(tok)` / `tiny_gpt2(tok)` are random-init causal LMs sized to the tokenizer.
`save_tiny_model(dir, ...)` writes an HF folder that `mta` loads like any real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow are the primary colors.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat.",
    "Alice quickly wrote a long letter to her old friend in Paris.",
    "Photosynthesis converts light energy into chemical energy stored in sugar.",
    "Tell me about the history of the Roman Empire and its famous emperors.",
    "I have been running every morning, and it has really improved my health.",
    "0123456789 !?.,;:'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]

# Short instruction records (prompt format) for caches and training runs in tests.
RECORDS = [
    {"prompt": "Name three primary colors.\n", "output": "Red, blue and yellow are the primary colors."},
    {"prompt": "Write a sentence about a fox.\n", "output": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Who wrote a letter?\n", "output": "Alice quickly wrote a long letter to her old friend in Paris."},
    {"prompt": "What does photosynthesis do?\n",
     "output": "Photosynthesis converts light energy into chemical energy stored in sugar."},
    {"prompt": "Say hi.\n", "output": "Hi there, friend!"},
    {"prompt": "Tell me about Rome.\n", "output": "The Roman Empire had famous emperors and long roads."},
    {"prompt": "Describe your morning.\n", "output": "I have been running every morning, and it really helps."},
    {"prompt": "What is on the mat?\n", "output": "The cat sleeps on a warm mat while the dog runs outside."},
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentencepiece_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(CORPUS)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_llama(tok, n_layers: int = 4, hidden: int = 48, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tok, n_layers: int = 4, hidden: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_model(directory: Path, tok, model) -> Path:
    """Write model + tokenizer as an HF folder and return its path."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list) -> Path:
    """Write `rows` to `path`, one per line (the format of `--data`): a dict as JSON, a str as it is (to write
    broken lines), None as an empty line."""
    lines = ("" if row is None else row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
             for row in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
