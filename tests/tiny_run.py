"""A tiny random model saved as a Hugging Face directory, a word-salad prompt file, and the
oracle judge that gives both classes whatever the model says: the pieces of a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from torsion.config import RunConfig
from torsion.judge.base import LABEL_SCORES, Verdict

from tiny import tiny_lm

WORDS = "how do i bake bread tell me a story about the dragon and knight please what is capital".split()
ORACLE_LABELS = ["strong_refuse", "weak_refuse", "strong_comply", "weak_comply", "degenerate"]


class OracleJudge:
    """Labels by a hash of the prompt, so both classes exist whatever a random model says."""

    name = "oracle"

    def judge(self, prompts, responses):
        labels = [ORACLE_LABELS[sum(map(ord, prompt)) % 5] for prompt in prompts]
        return [Verdict(label, LABEL_SCORES[label], self.name) for label in labels]


def write_tiny_model_dir(path: Path) -> Path:
    lm = tiny_lm("llama", n_layers=4)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def write_prompt_file(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS, size=rng.integers(2, 8))) + f" {i}",
             "category": ["a", "b"][i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model_dir: Path, prompt_file: Path, **overrides) -> RunConfig:
    return RunConfig.from_profile(
        "smoke", model=str(model_dir), sources=(str(prompt_file),), n_per_source=None,
        max_new_tokens=4, bootstrap=50, null_permutations=20, split_halves=5, **overrides)
