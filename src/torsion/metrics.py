"""Distribution shift and capability under steering (methods.md, "Distribution shift").

Each metric runs a base arm and, given ``steer`` (a zero-argument callable returning a
context manager: any steering method's ``method.factory(lm, strength)``, or
``lambda: add_steering(...)``), a steered arm. KL fields always name
their direction: ``kl_base_to_steered = Σ p_base log(p_base / p_steer)``. Prompts are
chat-templated and left-padded; reference texts and continuations are scored as given.

Example::

    steer = get_method("ace", vectors=v, means=mu, layers=[12], positions="all").factory(lm, 4.0)
    first_token_kl(lm, neutral_prompts, steer)["kl_base_to_steered"]
    perplexity(lm, reference_texts, steer)["perplexity"]
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torsion.capture import encode
from torsion.data.mcq import LETTERS, format_mcq, item_field
from torsion.errors import TorsionError
from torsion.models import LoadedModel, chat_prompt

SteerFactory = Callable[[], AbstractContextManager[Any]]


@contextmanager
def _arm(steer: SteerFactory | None, *, every_position: bool = False) -> Iterator[None]:
    """Run the steered arm inside ``steer()``, or the base arm when ``steer`` is ``None``.

    With ``every_position``, a context that yields a record steering only the last position or
    only generation steps is refused: in one teacher-forced forward it would leave every
    position that enters the loss unchanged (methods.md, defect 5).
    """
    if steer is None:
        yield
        return
    with steer() as record:
        if every_position and (getattr(record, "positions", "all") != "all"
                               or getattr(record, "phase", "both") == "generation"):
            raise TorsionError("this metric scores every position, but the steering covers only the last "
                               "token or only generation; steer with positions='all' and phase='both'")
        yield


def _left_pad(lm: LoadedModel, sequences: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Left-pad token id lists: ``input_ids``, ``attention_mask``, ``position_ids``, each ``[batch, seq]``."""
    width = max(len(s) for s in sequences)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device),
            "position_ids": position_ids.to(lm.device)}


@torch.inference_mode()
def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16,
                        steer: SteerFactory | None = None) -> Tensor:
    """Log-softmax of the next-token logits at the last prompt position, ``[n_prompts, vocab]`` float32.

    Only the last position's logits are computed (``logits_to_keep=1``), which keeps any
    final logit soft-capping of the model.
    """
    rows = []
    with _arm(steer):
        for start in range(0, len(prompts), batch_size):
            logits = lm.model(**encode(lm, prompts[start:start + batch_size]), logits_to_keep=1).logits
            rows.append(torch.log_softmax(logits[:, -1].float(), dim=-1).cpu())
    return torch.cat(rows)


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ p (log p − log q)`` per row, float64; ``logp``, ``logq`` are ``[n, vocab]`` log-probs.

    Terms with ``p = 0`` contribute 0.
    """
    logp, logq = logp.double(), logq.double()
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def kl_divergences(logp: Tensor, logq: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`kl_divergence` both ways, ``(KL(p ‖ q), KL(q ‖ p))``, from one float64 difference.

    Bit for bit the two :func:`kl_divergence` calls when every log-prob is finite (otherwise it
    makes those calls), and about twice as fast on ``[n_steps, batch, vocab]``. ``logp`` may
    broadcast against ``logq`` (one base row per prompt against many steered rows).
    """
    if not (torch.isfinite(logp).all() and torch.isfinite(logq).all()):
        return kl_divergence(logp, logq), kl_divergence(logq, logp)
    difference = logq.double() - logp.double()  # log q − log p
    p_to_q = -(logp.double().exp() * difference).sum(-1)
    q_to_p = logq.double().exp_().mul_(difference).sum(-1)
    return p_to_q, q_to_p


def _kl_summary(base_to_steered: Tensor, steered_to_base: Tensor) -> dict[str, Any]:
    """Means over prompts and the per-prompt values ``[n_prompts]``, each named by its direction."""
    return {"kl_base_to_steered": base_to_steered.mean().item(),
            "kl_steered_to_base": steered_to_base.mean().item(),
            "per_prompt_kl_base_to_steered": base_to_steered.tolist(),
            "per_prompt_kl_steered_to_base": steered_to_base.tolist()}


def first_token_kl(lm: LoadedModel, prompts: Sequence[str], steer: SteerFactory, *,
                   batch_size: int = 16) -> dict[str, Any]:
    """First-token KL on a (neutral) probe set, both directions, mean over prompts and per prompt."""
    base = next_token_logprobs(lm, prompts, batch_size)
    steered = next_token_logprobs(lm, prompts, batch_size, steer)
    return {**_kl_summary(kl_divergence(base, steered), kl_divergence(steered, base)), "position": "last",
            "n_prompts": len(prompts)}


def _prompt_continuation_ids(lm: LoadedModel, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of the chat-templated prompt followed by the continuation, and the continuation length.

    Prompt and continuation are tokenised separately, so the continuation's tokens are fixed
    whatever the prompt.
    """
    prompt_ids = lm.tokenizer(chat_prompt(lm.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    continuation_ids = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not continuation_ids:
        raise TorsionError(f"continuation for prompt {prompt[:40]!r} has no tokens; pass a non-empty continuation")
    return prompt_ids + continuation_ids, len(continuation_ids)


@torch.inference_mode()
def _continuation_logprobs(lm: LoadedModel, sequences: Sequence[tuple[list[int], int]], batch_size: int,
                           steer: SteerFactory | None) -> list[Tensor]:
    """Per sequence, the log-probs ``[n_continuation, vocab]`` that predict each continuation token."""
    out: list[Tensor] = []
    with _arm(steer, every_position=True):
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            logits = lm.model(**_left_pad(lm, [ids for ids, _ in batch])).logits
            for row, (_, n) in zip(logits, batch):  # position t predicts token t + 1
                out.append(torch.log_softmax(row[-n - 1:-1].float(), dim=-1).cpu())
    return out


def teacher_forced_kl(lm: LoadedModel, prompts: Sequence[str], continuations: Sequence[str],
                      steer: SteerFactory, *, batch_size: int = 8) -> dict[str, Any]:
    """Teacher-forced KL over a fixed reference continuation, both directions.

    Each prompt is followed by its continuation in one forward; the loss positions are the
    continuation's tokens. Per prompt: the mean KL over those tokens; the summary is the mean
    over prompts. The steering must cover every position (``positions="all"``).
    """
    if len(prompts) != len(continuations):
        raise TorsionError(f"{len(prompts)} prompts but {len(continuations)} continuations; pass one per prompt")
    sequences = [_prompt_continuation_ids(lm, p, c) for p, c in zip(prompts, continuations)]
    base = _continuation_logprobs(lm, sequences, batch_size, None)
    steered = _continuation_logprobs(lm, sequences, batch_size, steer)
    base_to_steered = torch.stack([kl_divergence(b, s).mean() for b, s in zip(base, steered)])
    steered_to_base = torch.stack([kl_divergence(s, b).mean() for b, s in zip(base, steered)])
    return {**_kl_summary(base_to_steered, steered_to_base), "n_tokens": [n for _, n in sequences],
            "position": "continuation_tokens"}


@torch.inference_mode()
def perplexity(lm: LoadedModel, texts: Sequence[str], steer: SteerFactory | None = None, *,
               batch_size: int = 8) -> dict[str, Any]:
    """Perplexity ``exp(mean NLL)`` of reference texts, the mean over every predicted token of every text.

    Texts are tokenised as given (the tokenizer's special tokens included, no chat template).
    With ``steer``, the steering must cover every position (``positions="all"``): every
    position enters the loss.
    """
    encoded = [lm.tokenizer(text)["input_ids"] for text in texts]
    if any(len(ids) < 2 for ids in encoded):
        raise TorsionError("a reference text has fewer than 2 tokens, so nothing is predicted; drop or extend it")
    total_nll, n_tokens = 0.0, 0
    with _arm(steer, every_position=True):
        for start in range(0, len(encoded), batch_size):
            inputs = _left_pad(lm, encoded[start:start + batch_size])
            logits = lm.model(**inputs).logits[:, :-1].float()
            targets, scored = inputs["input_ids"][:, 1:], inputs["attention_mask"][:, :-1].bool()
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [batch, seq - 1]
            total_nll += nll[scored].double().sum().item()
            n_tokens += int(scored.sum())
    mean_nll = total_nll / n_tokens
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "n_tokens": n_tokens}


def letter_token_ids(tokenizer: Any, letter: str) -> list[int]:
    """Single-token ids for ``letter`` and ``" " + letter`` (those that exist as one known token)."""
    ids = []
    for variant in (letter, f" {letter}"):
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise TorsionError(f"the tokenizer has no single token for answer letter {letter!r}; "
                           "MCQ scoring needs a model whose vocabulary has the letters")
    return ids


def mcq_accuracy(lm: LoadedModel, items: Sequence[object], steer: SteerFactory | None = None, *,
                 batch_size: int = 16) -> dict[str, Any]:
    """Accuracy on a multiple-choice probe, scored by the highest-logit answer letter.

    Items are objects or dicts with ``question``, ``choices`` and ``answer`` (a letter). A
    letter's score is the max next-token log-prob over its single-token variants (``"A"``,
    ``" A"``); the prediction is the best-scoring letter among the item's choices.
    """
    if not items:
        raise TorsionError("no MCQ items to score; pass at least one item")
    letters = [LETTERS[:len(item_field(item, "choices"))] for item in items]
    for item, valid in zip(items, letters):
        if item_field(item, "answer") not in valid:
            raise TorsionError(f"answer {item_field(item, 'answer')!r} is not one of {valid} for question "
                               f"{item_field(item, 'question')[:40]!r}; fix the item's answer letter")
    token_ids = {letter: letter_token_ids(lm.tokenizer, letter) for letter in set("".join(letters))}
    logprobs = next_token_logprobs(lm, [format_mcq(item) for item in items], batch_size, steer)
    predictions = [max(valid, key=lambda letter: row[token_ids[letter]].max().item())
                   for row, valid in zip(logprobs, letters)]
    correct = [p == item_field(item, "answer") for p, item in zip(predictions, items)]
    return {"accuracy": sum(correct) / len(items), "predictions": predictions, "correct": correct,
            "n_items": len(items), "scoring": "max next-token log-prob over answer-letter tokens"}
