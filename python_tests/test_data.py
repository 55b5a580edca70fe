"""Data loaders (CNN/DM in all three on-disk forms, aclsum) and prompt tokenization."""
import csv
import json

import pytest

from fastspec.data import (
    DataError,
    encode_references,
    encode_sources,
    load_aclsum,
    load_aclsum_papers,
    load_cnndm,
    load_examples,
    parse_story,
    prompt_template,
)
from distill_helpers import t5_tokenizer_dir


@pytest.fixture(scope="module")
def t5_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_dir())

ROWS = [
    {"id": "a1", "article": "The cat sat on the mat. It was happy.", "highlights": "Cat sits.\nCat is happy."},
    {"id": "b2", "article": "Stocks rose on Monday.", "highlights": "Stocks up."},
    {"id": "c3", "article": "Rain is expected, \"forecasters\" said.", "highlights": "Rain, maybe."},
]


def _expected():
    return [(r["id"], r["article"], r["highlights"]) for r in ROWS]


def _as_tuples(examples):
    return [(e.id, e.source, e.reference) for e in examples]


def test_jsonl_and_split_folder(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    assert _as_tuples(load_cnndm(str(path))) == _expected()
    assert _as_tuples(load_cnndm(str(tmp_path), split="train")) == _expected()
    assert _as_tuples(load_examples(str(tmp_path), "train", limit=2)) == _expected()[:2]


def test_csv(tmp_path):
    path = tmp_path / "validation.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "article", "highlights"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert _as_tuples(load_cnndm(str(path))) == _expected()
    # "val" is an alias of "validation"
    assert _as_tuples(load_cnndm(str(tmp_path), split="val")) == _expected()


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "cnn_dm"))
    assert _as_tuples(load_cnndm(str(tmp_path / "cnn_dm"), split="train")) == _expected()
    assert _as_tuples(load_cnndm(str(tmp_path / "cnn_dm"), split="test")) == _expected()[:1]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_cnndm(str(tmp_path / "cnn_dm"), split="validation")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert _as_tuples(load_cnndm(str(tmp_path / "single"))) == _expected()


STORY = """(CNN) -- The cat sat on the mat

It was happy.

@highlight

Cat sits

@highlight

Cat is happy!
"""


def test_story_folder(tmp_path):
    stories = tmp_path / "cnn" / "stories"
    stories.mkdir(parents=True)
    (stories / "0001abcd.story").write_text(STORY)
    (stories / "0002beef.story").write_text("Only one line\n\n@highlight\n\nshort")
    examples = load_cnndm(str(tmp_path))
    assert _as_tuples(examples) == [
        ("0001abcd", "(CNN) -- The cat sat on the mat . It was happy.", "Cat sits .\nCat is happy!"),
        ("0002beef", "Only one line .", "short ."),
    ]
    assert parse_story(STORY) == (examples[0].source, examples[0].reference)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_cnndm(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"article": "x", "highlights": "y"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        load_cnndm(str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="no 'article' field"):
        load_cnndm(str(cols))
    with pytest.raises(DataError, match="not a dataset"):
        load_examples("definitely-not-here")


def test_aclsum():
    train = load_aclsum("train")
    assert len(train) == 100 and len(load_aclsum("val")) == 50 and len(load_aclsum("test")) == 100
    first = train[0]
    assert first.id == "P06-1112"
    # detokenized by default (the stored text is "In this paper , we ..."), raw on request
    assert first.source.startswith("In this paper, we explore correlation of dependency relation paths")
    raw = load_aclsum("train", detokenize=False, limit=1)[0]
    assert raw.source.startswith("In this paper , we explore correlation of dependency relation paths")
    assert " , " in raw.source and " , " not in first.source and first.source.count(".") == raw.source.count(".")
    assert first.reference.startswith("A generally accessible NER system") and "They propose a statistical method" in first.reference
    outcome = load_examples("aclsum:conclusion:outcome", "test")
    assert len(outcome) == 100 and outcome[0].reference == load_aclsum("test", "conclusion", ("outcome",))[0].reference
    assert load_aclsum("train", "introduction")[0].source != first.source
    with pytest.raises(DataError):
        load_aclsum("train", source="methods")
    with pytest.raises(DataError):
        load_aclsum("nope")
    papers = load_aclsum_papers(limit=3)
    assert len(papers) == 3 and all(p.reference is None and len(p.source) > 1000 for p in papers)
    assert len(load_aclsum_papers()) == 250
    # split-aware: a paper's text holds its abstract and summary, so train papers must exclude test ones
    train_ids = {e.id for e in load_aclsum("train")}
    train_papers = load_examples("aclsum_papers", "train")
    assert len(train_papers) == 100 and {p.id for p in train_papers} == train_ids
    assert not {p.id for p in load_examples("aclsum_papers", "test")} & train_ids
    assert len(load_examples("aclsum_papers", "all")) == 250


def test_seq2seq_prompt_truncation(t5_tokenizer):
    sources = ["Hello world", "word " * 400]
    with pytest.warns(UserWarning, match="truncated 1 of 2 sources to max_source_length=32"):
        enc = encode_sources(t5_tokenizer, sources, is_encoder_decoder=True, max_source_length=32)
    assert enc.num_truncated == 1
    assert enc.input_ids[0] == [21603, 10, 8774, 296, 1]  # "summarize: Hello world</s>"
    assert len(enc.input_ids[1]) <= 32 and enc.input_ids[1][:2] == [21603, 10] and enc.input_ids[1][-1] == 1
    assert len(enc.input_ids[1]) >= 28  # cut close to the limit, not to nothing


def test_chat_prompt_keeps_template_tail(t5_tokenizer):
    tok = t5_tokenizer
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]{% endfor %}"
        "{% if add_generation_prompt %} [assistant]{% endif %}"
    )
    try:
        template = prompt_template(tok, is_encoder_decoder=False)
        assert template.startswith("[user] Summarize") and template.endswith("{source} [end] [assistant]")
        enc = encode_sources(tok, ["short text", "long " * 300], is_encoder_decoder=False, max_source_length=40, warn=False)
        assert enc.num_truncated == 1 and len(enc.input_ids[1]) <= 40
        tail = tok(" [end] [assistant]", add_special_tokens=False)["input_ids"]
        assert enc.input_ids[1][-len(tail):] == tail  # the generation prompt survives truncation
        assert tok.decode(enc.input_ids[0]).endswith("short text [end] [assistant]")
    finally:
        tok.chat_template = None


def test_references_end_with_eos(t5_tokenizer):
    refs = encode_references(t5_tokenizer, ["Hello world", None, "a " * 50], max_target_length=8)
    assert refs[0] == [8774, 296, 1] and refs[1] is None and len(refs[2]) == 8 and refs[2][-1] == 1
