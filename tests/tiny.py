"""Tiny randomly initialised models built from configs, with a word-level chat tokenizer.

No download, no assets: every mechanics test runs on these.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from torsion.models import LoadedModel, find_layout

WORDS = ("how do i bake bread tell me a story about the dragon and knight please what is "
         "capital of france explain why sky blue write poem cat dog hello").split()
SPECIAL = ["<pad>", "<unk>", "<eos>", "<user>", "<end>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(family: str, n_layers: int = 3):
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig,
               "gemma2": Gemma2Config}
    extra = {"head_dim": 8} if family.startswith("gemma") else {}
    return configs[family](**common, **extra)


def tiny_lm(family: str = "llama", n_layers: int = 3, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers), attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tiny_tokenizer(), find_layout(model), f"tiny:{family}", f"tiny-{family}", None)
