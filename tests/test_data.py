"""Dataset loading, prompt rendering and the uniform sampler."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.data import DataError, UniformSampler, load_prompts, prompts_from_rows, render_prompt
from groupwise.types import Prompt

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4", "level": 1},
    {"prompt": "What is 3+5?", "answer": "8", "level": 2},
    {"prompt": "What is 7*6?", "answer": "42", "level": 3},
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def check_rows(prompts, rows=ROWS):
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]
    assert [p.messages for p in prompts] == [None] * len(rows)
    assert [p.columns for p in prompts] == [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    assert [p.index for p in prompts] == list(range(len(rows)))


def raises(match: str, *parts: str):
    """pytest.raises(DataError) whose message contains every part, in order."""
    return pytest.raises(DataError, match=".*".join(re.escape(p) for p in (match, *parts)))


# ----------------------------------------------------------------------------- formats


def test_jsonl_skips_blank_lines_and_keeps_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in ROWS[1:]) + "\n")
    check_rows(load_prompts(path))


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2))
    check_rows(load_prompts(path))
    check_rows(load_prompts(str(path), format="json", limit=2), ROWS[:2])


def test_parquet(tmp_path):
    check_rows(load_prompts(write_parquet(tmp_path / "train.parquet", ROWS)))


def test_parquet_chat_messages_drop_arrow_null_fields(tmp_path):
    rows = [{"prompt": CHAT, "answer": "x"}, {"prompt": [{"role": "user", "content": "Yo", "name": "bob"}], "answer": "y"}]
    prompts = load_prompts(write_parquet(tmp_path / "chat.parquet", rows))
    assert prompts[0].messages == CHAT  # no 'name': None added by the Arrow struct
    assert prompts[1].messages == [{"role": "user", "content": "Yo", "name": "bob"}]
    assert prompts[0].text is None and prompts[1].columns == {"answer": "y"}


def test_hf_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    check_rows(load_prompts(tmp_path / "ds"))
    check_rows(load_prompts(tmp_path / "ds", format="hf_disk", limit=1), ROWS[:1])


def test_hf_dataset_dict_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    check_rows(load_prompts(tmp_path / "dd"))  # "train" by default
    check_rows(load_prompts(tmp_path / "dd", split="test"), ROWS[:1])
    with raises("dd", "no split 'validation'", "train", "test"):
        load_prompts(tmp_path / "dd", split="validation")

    datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "no_train"))
    with raises("no_train", "without a 'train' split", "splits: a"):
        load_prompts(tmp_path / "no_train")


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    check_rows(load_prompts(path, limit=2), ROWS[:2])
    check_rows(load_prompts(write_parquet(tmp_path / "t.parquet", ROWS), limit=1), ROWS[:1])
    with raises("limit must be at least 1"):
        load_prompts(path, limit=0)


def test_column_map_and_prompt_column(tmp_path):
    rows = [{"question": "Q1", "solution": "A1", "id": 7}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    [p] = load_prompts(path, column_map={"question": "prompt", "solution": "answer"})
    assert (p.text, p.columns) == ("Q1", {"answer": "A1", "id": 7})
    [p] = load_prompts(path, prompt_column="question")
    assert (p.text, p.columns) == ("Q1", {"solution": "A1", "id": 7})


def test_chat_prompts_and_in_memory_rows():
    prompts = prompts_from_rows([{"prompt": CHAT, "tests": ["assert f()"]}], source="builtin")
    assert prompts[0].messages == CHAT and prompts[0].text is None
    assert prompts[0].columns == {"tests": ["assert f()"]}
    assert prompts[0].as_reward_input == CHAT
    with raises("builtin, row 1", "empty string"):
        prompts_from_rows([{"prompt": "ok"}, {"prompt": "  "}], source="builtin")


# ----------------------------------------------------------------------------- errors


def test_malformed_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "x",\n')
    with raises("data.jsonl, line 3", "invalid JSON"):
        load_prompts(path)


def test_missing_prompt_column_names_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], {"question": "Q", "answer": "1"}])
    with raises("data.jsonl, line 2", "no prompt column 'prompt'", "columns: question, answer"):
        load_prompts(path)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n\n" + json.dumps({"prompt": 5}) + "\n")
    with raises("data.jsonl, line 4", "must be a string or a list of chat messages", "int 5"):
        load_prompts(path)


def test_bad_prompt_values_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [{"prompt": "ok"}, {"prompt": "ok"}, {"prompt": None}])
    with raises("train.parquet, row 2", "prompt column 'prompt' must be a string", "got null"):
        load_prompts(path)
    path = write_parquet(tmp_path / "num.parquet", [{"prompt": 1.5}])
    with raises("num.parquet, row 0", "must be a string or a list of chat messages", "float 1.5"):
        load_prompts(path)
    with raises("e.jsonl, line 1", "empty string"):
        load_prompts(write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]))


def test_malformed_messages(tmp_path):
    no_content = [{"prompt": CHAT}, {"prompt": [{"role": "user"}]}]
    with raises("m.jsonl, line 2", "message 0 has no 'content'"):
        load_prompts(write_jsonl(tmp_path / "m.jsonl", no_content))
    bad_role = [{"prompt": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}]
    with raises("r.jsonl, line 1", "message 1 has role 'robot'", "system, user, assistant, tool"):
        load_prompts(write_jsonl(tmp_path / "r.jsonl", bad_role))
    with raises("s.jsonl, line 1", "message 0", "expected an object"):
        load_prompts(write_jsonl(tmp_path / "s.jsonl", [{"prompt": ["hello"]}]))
    with raises("l.jsonl, line 1", "empty list of chat messages"):
        load_prompts(write_jsonl(tmp_path / "l.jsonl", [{"prompt": []}]))


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with raises("data.jsonl, line 2", "expected an object of columns"):
        load_prompts(path)


def test_mapped_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "1"}])
    with raises("qa.jsonl", "'problem'", "columns: question, answer"):
        load_prompts(path, column_map={"problem": "prompt"})


def test_missing_path_unsupported_extension_and_empty(tmp_path):
    with raises(f"dataset path '{tmp_path / 'nope.jsonl'}' does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nhi\n")
    with raises("data.csv", "supported: .jsonl, .json, .parquet"):
        load_prompts(csv)
    (tmp_path / "plain_dir").mkdir()
    with raises("plain_dir", "save_to_disk"):
        load_prompts(tmp_path / "plain_dir")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with raises("empty.jsonl", "empty"):
        load_prompts(empty)
    with raises("empty.json", "empty"):
        (tmp_path / "empty.json").write_text("[]")
        load_prompts(tmp_path / "empty.json")
    with raises("obj.json", "expected a JSON list of objects"):
        (tmp_path / "obj.json").write_text('{"prompt": "x"}')
        load_prompts(tmp_path / "obj.json")


def test_split_on_a_file_is_an_error(tmp_path):
    with raises("data.jsonl", "split='test'", "no splits"):
        load_prompts(write_jsonl(tmp_path / "data.jsonl", ROWS), split="test")


# ----------------------------------------------------------------------------- rendering


def make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    return tok


def test_render_messages_with_template():
    tok = make_tokenizer(chat=True)
    user_only = Prompt(text=None, messages=[{"role": "user", "content": "Hi?"}])
    assert render_prompt(user_only, tok) == "<user>Hi?\n<assistant>"
    assert render_prompt(user_only, tok, system_prompt="S") == "<system>S\n<user>Hi?\n<assistant>"
    with_system = Prompt(text=None, messages=CHAT)
    assert render_prompt(with_system, tok, system_prompt="ignored") == "<system>Be brief.\n<user>Hi?\n<assistant>"
    assert user_only.messages == [{"role": "user", "content": "Hi?"}]  # not mutated


def test_render_text():
    tok = make_tokenizer(chat=True)
    p = Prompt(text="2+2?", messages=None)
    assert render_prompt(p, tok) == "2+2?"
    assert render_prompt(p, tok, chat_template=False, system_prompt="S") == "S\n\n2+2?"
    assert render_prompt(p, tok, chat_template=True) == "<user>2+2?\n<assistant>"
    assert render_prompt(p, tok, chat_template=True, system_prompt="S") == "<system>S\n<user>2+2?\n<assistant>"
    assert render_prompt(p, make_tokenizer(chat=False), system_prompt="S") == "S\n\n2+2?"


def test_render_without_template_errors():
    tok = make_tokenizer(chat=False)
    with raises("chat conversation", "no chat template", "plain-text prompts"):
        render_prompt(Prompt(text=None, messages=CHAT, index=3), tok)
    with raises("chat_template=True", "no chat template"):
        render_prompt(Prompt(text="x", messages=None), tok, chat_template=True)


# ----------------------------------------------------------------------------- sampler


def test_sampler_deterministic_and_seed_dependent():
    a, b, c = UniformSampler(50, seed=1), UniformSampler(50, seed=1), UniformSampler(50, seed=2)
    first = a.next_indices(120)
    assert first == b.next_indices(120)
    assert first != c.next_indices(120)


def test_sampler_epochs_are_fresh_permutations():
    s = UniformSampler(10, seed=0)
    epochs = [s.next_indices(10) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and s.epoch == 3 and s.position == 0


def test_sampler_crosses_epoch_boundary():
    whole = UniformSampler(7, seed=3).next_indices(21)
    s = UniformSampler(7, seed=3)
    assert s.next_indices(5) == whole[:5]
    assert s.next_indices(5) == whole[5:10]  # 2 from epoch 0, 3 from epoch 1
    assert (s.epoch, s.position) == (1, 3)
    assert s.next_indices(11) == whole[10:21] and (s.epoch, s.position) == (3, 0)
    assert s.next_indices(0) == []


def test_sampler_in_order_and_validation():
    s = UniformSampler(4, seed=9, shuffle=False)
    assert s.next_indices(6) == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="num_prompts"):
        UniformSampler(0, seed=0)
    with pytest.raises(ValueError, match="saved for 5 prompts"):
        UniformSampler(4, seed=0).load_state_dict(UniformSampler(5, seed=0).state_dict())
    assert s.plan(2, 3).group_sizes == [3, 3]


@settings(max_examples=60, deadline=None)
@given(
    num_prompts=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    before=st.lists(st.integers(0, 50), max_size=5),
    after=st.lists(st.integers(0, 50), min_size=1, max_size=5),
)
def test_sampler_state_round_trip(num_prompts, seed, before, after):
    original = UniformSampler(num_prompts, seed)
    for n in before:
        original.next_indices(n)
    state = json.loads(json.dumps(original.state_dict()))
    restored = UniformSampler(num_prompts, seed=seed + 1)  # the state's seed wins
    restored.load_state_dict(state)
    assert [restored.next_indices(n) for n in after] == [original.next_indices(n) for n in after]
