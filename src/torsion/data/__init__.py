"""Prompt data: sources, local files, deduplication, seeded splits and samples, ``prompts.jsonl``.

Modules, in the order data flows through them:

- :mod:`~torsion.data.records`: the :class:`Prompt` record and the ``prompts.jsonl`` file;
- :mod:`~torsion.data.files`: the user's ``.csv``/``.json``/``.jsonl`` prompt files;
- :mod:`~torsion.data.mcq`: the shipped multiple-choice probe and its formatter;
- :mod:`~torsion.data.sources`: :func:`load_source` over every kind of source;
- :mod:`~torsion.data.splits`: :func:`deduplicate`, :func:`assign_split`, :func:`sample`,
  :func:`build_prompt_set`.
"""

from torsion.data.mcq import LETTERS, MCQItem, format_mcq, item_field, load_mcq
from torsion.data.records import Prompt, make_prompt, prompt_hash, read_prompts_jsonl, write_prompts_jsonl
from torsion.data.sources import BUILTIN, load_source
from torsion.data.splits import assign_split, build_prompt_set, deduplicate, sample

__all__ = [
    "BUILTIN", "LETTERS", "MCQItem", "Prompt", "assign_split", "build_prompt_set", "deduplicate",
    "format_mcq", "item_field", "load_mcq", "load_source", "make_prompt", "prompt_hash", "read_prompts_jsonl",
    "sample", "write_prompts_jsonl",
]
