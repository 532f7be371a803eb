"""Prompt data: built-in sources, local files, deduplication, seeded splits, ``prompts.jsonl``."""

from torsion.data.mcq import LETTERS, MCQItem, format_mcq, item_field, load_mcq
from torsion.data.sources import (
    BUILTIN,
    Prompt,
    assign_split,
    build_prompt_set,
    deduplicate,
    load_source,
    make_prompt,
    prompt_hash,
    read_prompts_jsonl,
    sample,
    write_prompts_jsonl,
)

__all__ = [
    "BUILTIN", "LETTERS", "MCQItem", "Prompt", "assign_split", "build_prompt_set", "deduplicate",
    "format_mcq", "item_field", "load_mcq", "load_source", "make_prompt", "prompt_hash", "read_prompts_jsonl",
    "sample", "write_prompts_jsonl",
]
