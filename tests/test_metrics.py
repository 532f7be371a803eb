import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from torsion.capture import encode, output_tensor
from torsion.errors import TorsionError
from torsion.data import format_mcq
from torsion.metrics import (first_token_kl, kl_divergence, letter_token_ids, mcq_accuracy, 
                             next_token_logprobs, perplexity, teacher_forced_kl)
from torsion.models import LoadedModel, chat_prompt
from torsion.steer import add_steering

from tiny import WORDS, tiny_lm, tiny_tokenizer

PROMPTS = ["how do i bake bread", "hello", "tell me a story about the dragon and the knight please"]
CONTINUATIONS = ["the dragon and knight", "hello cat", "what is the capital of france"]
TEXTS = ["the cat and the dog", "why is the sky blue please explain", "hello cat and dog"]


def _vectors(lm):
    return torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(1))


def _steer(lm, alpha, positions="all", layers=(0, 1)):
    return lambda: add_steering(lm, _vectors(lm), layers=list(layers), alpha=alpha, positions=positions)


@torch.no_grad()
def _hand_steered_logits(lm, inputs, alpha, positions="all"):
    """Logits with ``α v`` added to the last block's output, by hand from the unsteered forward:
    capture that block's output ``h`` ``[batch, seq, d_model]``, then ``lm_head(final_norm(h + α v))``."""
    captured = []
    handle = lm.layout.blocks[-1].register_forward_hook(lambda m, i, o: captured.append(output_tensor(o).clone()))
    try:
        lm.model(**inputs)
    finally:
        handle.remove()
    hidden, shift = captured[0], alpha * _vectors(lm)[-1]
    if positions == "last":
        hidden[:, -1] += shift
    else:
        hidden += shift
    return lm.model.lm_head(lm.layout.final_norm(hidden)).double()


def test_kl_divergence_matches_a_hand_computation():
    p, q = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.2, 0.2, 0.6]])
    forward = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    reverse = 0.2 * math.log(0.2 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.6 * math.log(0.6 / 0.2)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(forward, abs=1e-7)
    assert kl_divergence(q.log(), p.log()).item() == pytest.approx(reverse, abs=1e-7)
    assert kl_divergence(p.log(), q.log()).dtype == torch.float64
    certain = torch.tensor([[1.0, 0.0, 0.0]])  # p = 0 terms contribute nothing, not nan
    assert kl_divergence(certain.log(), q.log()).item() == pytest.approx(math.log(1 / 0.2), abs=1e-7)


def test_next_token_logprobs_equal_the_full_forward_and_unpadded_prompts():
    lm = tiny_lm("gemma2")  # final-logit soft-capping must be kept
    logprobs = next_token_logprobs(lm, PROMPTS, batch_size=2)
    with torch.no_grad():
        full = lm.model(**encode(lm, PROMPTS)).logits[:, -1].log_softmax(-1)
        alone = torch.cat([lm.model(**encode(lm, [p])).logits[:, -1].log_softmax(-1) for p in PROMPTS])
    torch.testing.assert_close(logprobs, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs, alone, atol=1e-5, rtol=0)


def test_first_token_kl_equals_a_hand_computation_at_the_last_block():
    lm = tiny_lm("llama")
    last = lm.n_layers - 1
    result = first_token_kl(lm, PROMPTS, _steer(lm, 0.3, positions="last", layers=[last]), batch_size=2)
    inputs = encode(lm, PROMPTS)  # left-padded: -1 is every prompt's last token
    base = torch.log_softmax(_hand_steered_logits(lm, inputs, 0.0)[:, -1], -1).numpy()
    steered = torch.log_softmax(_hand_steered_logits(lm, inputs, 0.3, "last")[:, -1], -1).numpy()
    forward = (np.exp(base) * (base - steered)).sum(-1)  # Σ p_base log(p_base / p_steer)
    reverse = (np.exp(steered) * (steered - base)).sum(-1)
    assert result["per_prompt_kl_base_to_steered"] == pytest.approx(forward.tolist(), rel=1e-4)
    assert result["per_prompt_kl_steered_to_base"] == pytest.approx(reverse.tolist(), rel=1e-4)
    assert result["kl_base_to_steered"] == pytest.approx(forward.mean(), rel=1e-4)
    # a small α: the last norm saturates on these tiny models, so a 1% error in α moves the KL ~1e-3
    assert forward.min() > 1e-3


def test_first_token_kl_names_both_directions_and_matches_torch():
    lm = tiny_lm("llama")
    result = first_token_kl(lm, PROMPTS, _steer(lm, 4.0, positions="last"), batch_size=2)
    assert {k for k in result if "kl" in k} == {"kl_base_to_steered", "kl_steered_to_base",
                                                "per_prompt_kl_base_to_steered", "per_prompt_kl_steered_to_base"}
    base = next_token_logprobs(lm, PROMPTS)
    steered = next_token_logprobs(lm, PROMPTS, steer=_steer(lm, 4.0, positions="last"))
    # torch's kl_div(input, target) = Σ target (log target − input), i.e. KL(target ‖ input)
    expected = F.kl_div(steered.double(), base.double(), log_target=True, reduction="none").sum(-1)
    assert result["per_prompt_kl_base_to_steered"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert result["kl_base_to_steered"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert result["kl_base_to_steered"] > 0 and result["kl_steered_to_base"] > 0
    assert result["kl_base_to_steered"] != pytest.approx(result["kl_steered_to_base"], rel=1e-3)


def test_teacher_forced_kl_equals_one_unpadded_sequence_by_hand():
    lm = tiny_lm("qwen2")
    result = teacher_forced_kl(lm, PROMPTS, CONTINUATIONS, _steer(lm, 4.0), batch_size=2)
    assert result["kl_base_to_steered"] > 0 and result["kl_steered_to_base"] > 0
    assert result["n_tokens"] == [4, 2, 6]
    # by hand, one unpadded sequence: positions n_prompt-1 … end-1 predict the continuation's tokens
    text = chat_prompt(lm.tokenizer, PROMPTS[1]) + " " + CONTINUATIONS[1]
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits[0, -3:-1].log_softmax(-1)
        with _steer(lm, 4.0)():
            steered = lm.model(input_ids=ids).logits[0, -3:-1].log_softmax(-1)
    expected = kl_divergence(base, steered).mean().item()
    assert result["per_prompt_kl_base_to_steered"][1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("metric", ["teacher_forced_kl", "perplexity"])
def test_metrics_scoring_every_position_refuse_last_position_steering(metric):
    lm = tiny_lm("llama")
    with pytest.raises(TorsionError, match="steer with positions='all'"):
        if metric == "perplexity":
            perplexity(lm, TEXTS, _steer(lm, 4.0, positions="last"))
        else:
            teacher_forced_kl(lm, PROMPTS, CONTINUATIONS, _steer(lm, 4.0, positions="last"))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_perplexity_equals_the_models_own_loss_and_changes_under_steering(family):
    lm = tiny_lm(family)
    base = perplexity(lm, TEXTS, batch_size=2)
    total_nll, n_tokens = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:  # independent: one unpadded text at a time, the model's mean loss
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            total_nll += lm.model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n_tokens += ids.shape[1] - 1
    assert base["n_tokens"] == n_tokens == 4 + 6 + 3
    assert base["perplexity"] == pytest.approx(math.exp(total_nll / n_tokens), rel=1e-5)
    last = lm.n_layers - 1
    steered = perplexity(lm, TEXTS, _steer(lm, 0.1, layers=[last]), batch_size=2)
    total_nll = 0.0
    for text in TEXTS:  # by hand: α v on the last block's output at every position that enters the loss
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        logprobs = torch.log_softmax(_hand_steered_logits(lm, {"input_ids": ids}, 0.1)[0, :-1], -1)
        total_nll -= logprobs.gather(1, ids[0, 1:, None]).sum().item()
    assert steered["perplexity"] == pytest.approx(math.exp(total_nll / n_tokens), rel=1e-5)
    assert abs(steered["perplexity"] - base["perplexity"]) > 5e-3 * base["perplexity"]


def _letter_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny vocabulary with four words swapped for the answer letters (same size, so same model)."""
    return tiny_tokenizer(["A", "B", "C", "D"] + WORDS[4:])


ITEMS = [
    {"question": "what is the capital of france", "choices": ["cat", "dog", "paris", "sky"], "answer": "C"},
    SimpleNamespace(question="why is the sky blue", choices=["dragon", "poem", "story", "knight"], answer="A"),
    {"question": "tell me a story", "choices": ["hello", "please", "bread", "me"], "answer": "B"},
    {"question": "what is a cat", "choices": ["dog", "cat", "sky", "blue"], "answer": "D"},
]


def test_mcq_accuracy_scores_the_highest_logit_letter():
    base = tiny_lm("llama")
    lm = LoadedModel(base.model, _letter_tokenizer(), base.layout, base.spec, base.model_id, None)
    letter_ids = [lm.tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    expected = []
    with torch.no_grad():  # by hand: argmax of the four letters' logits after each rendered prompt
        for item in ITEMS:
            logits = lm.model(**encode(lm, [format_mcq(item)])).logits[0, -1]
            expected.append("ABCD"[int(logits[letter_ids].argmax())])
    result = mcq_accuracy(lm, ITEMS, batch_size=3)
    answers = [item["answer"] if isinstance(item, dict) else item.answer for item in ITEMS]
    assert result["predictions"] == expected
    assert result["correct"] == [p == a for p, a in zip(expected, answers)]
    assert result["accuracy"] == sum(result["correct"]) / 4
    inputs = encode(lm, [format_mcq(item) for item in ITEMS])  # steered at the last block, by hand
    hand = ["ABCD"[int(row[letter_ids].argmax())] for row in _hand_steered_logits(lm, inputs, 6.0, "last")[:, -1]]
    steered = mcq_accuracy(lm, ITEMS, _steer(lm, 6.0, positions="last", layers=[lm.n_layers - 1]), batch_size=3)
    assert steered["predictions"] == hand and hand != expected
    with pytest.raises(TorsionError, match="answer 'E' is not one of ABCD"):
        mcq_accuracy(lm, [{**ITEMS[0], "answer": "E"}])


def test_letter_variants_with_and_without_space_are_both_scored():
    class SpacedTokenizer:  # "A" and " A" are distinct single tokens; "C" is two tokens; "D" unknown
        unk_token_id = 0
        ids = {"A": [10], " A": [11], "B": [12], " B": [12], "C": [13, 14], " C": [15], "D": [0], " D": [0]}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.ids[text]}

    tokenizer = SpacedTokenizer()
    assert letter_token_ids(tokenizer, "A") == [10, 11]
    assert letter_token_ids(tokenizer, "B") == [12]
    assert letter_token_ids(tokenizer, "C") == [15]
    with pytest.raises(TorsionError, match="no single token for answer letter 'D'"):
        letter_token_ids(tokenizer, "D")
