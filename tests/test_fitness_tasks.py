"""Task suites without a model: loading, one-line errors, splits, the test-set guard, metrics."""
from __future__ import annotations

import json

import pytest

from evomerge.records import UserError
from evomerge.fitness.metrics import last_number, make_metric, numeric
from evomerge.fitness.tasks import TaskSpec, hashed_split, load_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n):
    return [{"prompt": f"what is {i} plus 1? answer ", "reference": str(i + 1)} for i in range(n)]


def test_jsonl_loads_the_zoo_format(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", rows(5) + [{"prompt": "p", "reference": "r", "level": 3}])
    task = load_task({"name": "t", "path": str(f)})
    assert [e.reference for e in task.examples] == ["1", "2", "3", "4", "5", "r"]
    assert task.examples[-1].fields == {"level": 3}
    assert task.prompt(task.examples[0]) == "what is 0 plus 1? answer "


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json}\n", "t.jsonl:3: not valid JSON"),
        ('{"prompt": "p"}\n', "t.jsonl:3: missing 'reference'"),
        ('{"prompt": 1, "reference": "r"}\n', "t.jsonl:3: 'prompt' must be a string"),
        ('["a", "b", "c"]\n', "t.jsonl:3: an example is an object"),
    ],
)
def test_malformed_line_is_named(tmp_path, bad, message):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(rows(1)[0]) + "\n\n" + bad)  # line 2 is blank and skipped, the culprit is line 3
    with pytest.raises(UserError) as e:
        load_task({"name": "t", "path": str(f)})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_one_line_errors(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", rows(3))
    cases = [
        ({"name": "t", "path": str(f), "metric": "x"}, "unknown key 'metric'"),
        ({"name": "t"}, "exactly one of 'path'"),
        ({"name": "t", "path": str(tmp_path / "nope.jsonl")}, "task file not found"),
        ({"name": "t", "path": str(f), "metrics": ["bleu"]}, "unknown metric 'bleu'"),
        ({"name": "t", "path": str(f), "metrics": ["exact_match", "numeric"]}, "give one an 'as'"),
        ({"name": "t", "path": str(f), "metrics": [{"name": "regex", "pattern": "("}]}, "is invalid"),
        ({"name": "t", "path": str(f), "fractions": [0.5, 0.2, 0.2]}, "summing to 1"),
        ({"name": "t", "generator": "no_such_module_xyz:gen"}, "cannot import"),
        ({"name": "t", "path": str(f), "fewshot": "two"}, "fewshot must be a number, got 'two'"),
        ({"name": "t", "path": str(f), "metrics": []}, "metrics is a non-empty list"),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            load_task(cfg)


def test_splits_are_deterministic_disjoint_and_order_free(tmp_path):
    data = rows(300)
    a = write_jsonl(tmp_path / "a.jsonl", data)
    b = write_jsonl(tmp_path / "b.jsonl", list(reversed(data)) + [{"prompt": "new one", "reference": "x"}])
    got = {}
    for split in ("train", "dev"):
        ta = load_task({"name": "a", "path": str(a), "split": split})
        tb = load_task({"name": "b", "path": str(b), "split": split})
        got[split] = {e.prompt for e in ta.examples}
        assert got[split] == {e.prompt for e in tb.examples} - {"new one"}  # same split after reorder + growth
    test = load_task({"name": "a", "path": str(a), "split": "test", "allow_test_set": True})
    sets = [got["train"], got["dev"], {e.prompt for e in test.examples}]
    assert sum(map(len, sets)) == 300 and not (sets[0] & sets[1]) and not (sets[1] & sets[2])
    assert 200 < len(sets[0]) < 280 and 10 < len(sets[1]) < 50  # roughly 0.8 / 0.1 / 0.1
    # another seed reshuffles
    assert {hashed_split(p, 1, (0.8, 0.1, 0.1)) for p in got["dev"]} != {"dev"}


def test_explicit_split_field_wins(tmp_path):
    data = rows(10)
    for r in data:
        r["split"] = "dev" if r["reference"] in ("1", "2") else "train"
    f = write_jsonl(tmp_path / "t.jsonl", data)
    assert [e.reference for e in load_task({"name": "t", "path": str(f), "split": "dev"}).examples] == ["1", "2"]


def test_fewshot_demos_come_from_train_and_are_not_scored(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", rows(100))
    task = load_task({"name": "t", "path": str(f), "split": "dev", "fewshot": 2, "prompt_format": "Q {prompt}"})
    assert len(task.demos) == 2 and all(hashed_split(d.prompt, 0, (0.8, 0.1, 0.1)) == "train" for d in task.demos)
    prompt = task.prompt(task.examples[0])
    d0, d1 = task.demos
    assert prompt == f"Q {d0.prompt}{d0.reference}\nQ {d1.prompt}{d1.reference}\nQ {task.examples[0].prompt}"
    chat = load_task({"name": "t", "path": str(f), "split": "dev", "fewshot": 1, "template": "chat", "system": "S"})
    msgs = chat.prompt(chat.examples[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == chat.demos[0].reference


def test_guard_refuses_public_test_sets_unless_insisted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "gsm8k").mkdir()
    gsm = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows(4))
    mgsm = write_jsonl(tmp_path / "data" / "mgsm_ja.jsonl", rows(4))
    train = write_jsonl(tmp_path / "data" / "gsm8k_train.jsonl", rows(60))
    for cfg in ({"name": "g", "path": str(gsm)}, {"name": "m", "path": str(mgsm)},
                {"name": "own", "path": str(train), "split": "test"}):
        with pytest.raises(UserError, match="allow_test_set: true"):
            load_task(cfg)
        assert load_task({**cfg, "allow_test_set": True}).examples
    assert load_task({"name": "g", "path": str(train)}).examples  # a public train set is fine


def gen_examples(n: int, offset: int = 0):
    return [(f"q{i}", str(i + offset)) for i in range(n)] + [{"prompt": "d", "reference": "e"}]


def test_generator_task():
    task = load_task({"name": "g", "generator": f"{__name__}:gen_examples", "generator_args": {"n": 3, "offset": 5}})
    assert [(e.prompt, e.reference) for e in task.examples] == [("q0", "5"), ("q1", "6"), ("q2", "7"), ("d", "e")]


def test_numeric_answer_is_the_last_number():
    assert last_number("so 12 + 30 = 42.") == 42.0
    assert last_number("answer: 1,024 apples") == 1024.0
    assert last_number("it is -7") == -7.0 and last_number("none") is None
    assert numeric("first 3 then 41", "41") == 1.0 and numeric("41 then 3", "41") == 0.0
    assert numeric("42.0", "42") == 1.0 and numeric("", "1") == 0.0
    assert numeric("57 ОЦ", "57 ОЦ") == 1.0  # the zoo's J marker after the number


def test_regex_metric_uses_the_group():
    m = make_metric({"name": "regex", "pattern": r"answer is (\w+)"}, "t")
    fn = m.generation_fn()
    assert fn("the answer is B.", "B") == 1.0 and fn("the answer is C", "B") == 0.0 and fn("B", "B") == 0.0
    assert m.objective("t") == "acc/t" and m.direction == "max"
    assert make_metric("length", "t").direction == "min" and make_metric({"name": "loss", "as": "nll"}, "t").objective("t") == "nll/t"


def test_spec_paths_resolve_against_config_dir(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    assert len(load_task(TaskSpec.from_dict({"name": "t", "path": "t.jsonl"}, base_dir=tmp_path)).examples) == 2


def test_reads_the_zoo_task_files_as_the_zoo_writes_them(tmp_path):
    from evomerge.zoo.tasks import eval_splits

    exs = eval_splits()["math_j_dev"]
    f = tmp_path / "math_j_dev.jsonl"  # written exactly as evomerge/zoo/build.py writes its data files
    f.write_text("\n".join(json.dumps({"prompt": p, "reference": r}, ensure_ascii=False) for p, r in exs) + "\n",
                 encoding="utf-8")
    task = load_task({"name": "math_j", "path": str(f), "metrics": ["exact_match"]})
    assert [(e.prompt, e.reference) for e in task.examples] == exs
