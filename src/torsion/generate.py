"""Batched, resumable generation with judging.

Responses are appended to ``responses.jsonl`` one whole batch at a time, already judged,
so a killed run loses at most the batch in flight and a re-run skips every id on file.

Example::

    settings = GenerationSettings(max_new_tokens=32)
    generate_responses(lm, prompts, run.responses_path, settings=settings, judge=get_judge("rules"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from torsion.capture import encode
from torsion.judge.base import Judge
from torsion.judge.correction import row_correction
from torsion.models import LoadedModel
from torsion.store import append_jsonl, read_jsonl

if TYPE_CHECKING:
    from torsion.data import Prompt


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, recorded in the manifest. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@torch.inference_mode()
def generate_batch(lm: LoadedModel, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """Generate one left-padded batch and return the decoded continuations."""
    inputs = encode(lm, prompts)
    inputs.pop("position_ids")  # generate() derives them from the attention mask
    output = lm.model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=lm.tokenizer.pad_token_id,
        **settings.generate_kwargs(),
    )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in lm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_responses(lm: LoadedModel, prompts: Sequence[Prompt], path: Path, *,
                       settings: GenerationSettings, judge: Judge) -> list[dict]:
    """Generate and judge every prompt not yet in ``path``; return all rows in prompt order.

    Pending prompts are processed shortest first, which keeps padding (and time) low; the
    file's order does not matter because rows are matched by ``id``.
    """
    done = {row["id"] for row in read_jsonl(path)}
    pending = [p for p in prompts if p.id not in done]
    lengths = {p.id: len(lm.tokenizer(p.prompt)["input_ids"]) for p in pending}
    pending.sort(key=lambda p: lengths[p.id])
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(pending), desc="generate", unit="prompt")
    for start in range(0, len(pending), settings.batch_size):
        batch = pending[start:start + settings.batch_size]
        if settings.temperature > 0:  # a batch's draws depend on its prompts, not on resumes
            torch.manual_seed(settings.seed ^ int(batch[0].prompt_hash[:8], 16))
        responses = generate_batch(lm, [p.prompt for p in batch], settings)
        verdicts = judge.judge([p.prompt for p in batch], responses)
        append_jsonl(path, (
            {"id": p.id, "response": r, "label": v.label, "score": v.score, "judge": v.judge,
             "reasons": list(v.reasons), "correction": row_correction(p.prompt, r, v.score)}
            for p, r, v in zip(batch, responses, verdicts)
        ))
        bar.update(len(batch))
    bar.close()
    by_id = {row["id"]: row for row in read_jsonl(path)}
    return [by_id[p.id] for p in prompts]
