"""Zero-shot task accuracy (sparsekern.tasks, `sparsekern eval --tasks`) with lm-evaluation-harness, offline.

The task is a local 12-question multiple-choice JSONL (tests/data/tiny_mc.jsonl) described by a task YAML written
here, run on the tiny random Llama with the character tokenizer. lm-eval's accuracy is checked against an
independent computation: each choice's summed log-likelihood given the question, scored with the model directly."""

import json
import sys
from pathlib import Path

import pytest
import torch

from checks import run_cli

DATA = Path(__file__).parent / "data" / "tiny_mc.jsonl"

TASK_YAML = """\
task: {name}
dataset_path: {dataset_path}
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str = "tiny_mc", dataset_path: str = "json", data: Path = DATA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, dataset_path=dataset_path, data=data))
    return path


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture
def task_yaml(tmp_path, lm_eval):
    return write_task(tmp_path / "tasks")


DOCS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def choice_scores(model) -> list[list[float]]:
    """Each document's per-choice log-likelihoods, computed without lm-eval: the character tokenizer maps each
    character to one token, so the continuation " " + choice is the last len(choice) + 1 tokens of
    prompt + " " + choice, scored by the model given everything before it. One forward pass over every
    (document, choice), right-padded: a causal model's logits at the real positions ignore what follows."""
    texts = [(f"Question: {doc['question']}\nAnswer: {choice}", len(choice) + 1)
             for doc in DOCS for choice in doc["choices"]]
    width = max(len(text) for text, _ in texts)
    ids = torch.tensor([[ord(c) for c in text] + [0] * (width - len(text)) for text, _ in texts])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)
    flat = []
    for row, (text, n) in enumerate(texts):
        end = len(text)
        flat.append(logp[row, end - n - 1 : end - 1].gather(1, ids[row, end - n : end, None]).sum().item())
    scores, start = [], 0
    for doc in DOCS:
        scores.append(flat[start : start + len(doc["choices"])])
        start += len(doc["choices"])
    return scores


def accuracy(scores: list[list[float]], limit: int | None = None) -> tuple[float, float]:
    """(acc, acc_norm) over the first ``limit`` documents: the argmax of the log-likelihoods, and of the
    log-likelihoods divided by each choice's length in characters (lm-eval's acc_norm)."""
    docs = DOCS[:limit]
    hits = sum(max(range(len(s)), key=s.__getitem__) == d["label"] for s, d in zip(scores, docs))
    normed = [[x / len(c) for x, c in zip(s, d["choices"])] for s, d in zip(scores, docs)]
    hits_norm = sum(max(range(len(s)), key=s.__getitem__) == d["label"] for s, d in zip(normed, docs))
    return hits / len(docs), hits_norm / len(docs)


def smallest_margin(scores: list[list[float]]) -> float:
    """The closest call between a document's two best choices (raw and length-normalised)."""
    gaps = []
    for s, d in zip(scores, DOCS):
        for values in (s, [x / len(c) for x, c in zip(s, d["choices"])]):
            top = sorted(values, reverse=True)
            gaps.append(top[0] - top[1])
    return min(gaps)


def test_zero_shot_matches_independent_scoring(tiny_llama, char_tokenizer, task_yaml):
    from sparsekern.tasks import load_tasks, zero_shot

    rng_before = torch.random.get_rng_state()
    task_set = load_tasks(str(task_yaml), progress=False)
    result = zero_shot(tiny_llama, char_tokenizer, task_set, progress=False)
    metrics = result["tasks"]["tiny_mc"]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert metrics["samples"] == 12 and metrics["num_fewshot"] == 0
    assert metrics["acc_stderr"] > 0 and metrics["acc_norm_stderr"] > 0
    scores = choice_scores(tiny_llama)
    assert smallest_margin(scores) > 1e-4, "a near-tie between two choices would make the comparison fragile"
    acc, acc_norm = accuracy(scores)
    assert 0 < acc < 1 and any(  # a meaningful check: some answers right, some wrong, and acc_norm picks differ
        max(range(len(s)), key=s.__getitem__) != max(range(len(s)), key=lambda i: s[i] / len(d["choices"][i]))
        for s, d in zip(scores, DOCS))
    assert metrics["acc"] == pytest.approx(acc, abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)

    # The same TaskSet runs again (e.g. after pruning), a few-shot setting not carried over; `limit` scores the
    # first documents only.
    shots = zero_shot(tiny_llama, char_tokenizer, task_set, limit=2, num_fewshot=1, progress=False)
    assert shots["tasks"]["tiny_mc"]["num_fewshot"] == 1 and shots["tasks"]["tiny_mc"]["samples"] == 2
    limited = zero_shot(tiny_llama, char_tokenizer, task_set, limit=5, batch_size=2, progress=False)
    assert limited["tasks"]["tiny_mc"]["samples"] == 5 and limited["limit"] == 5
    assert limited["tasks"]["tiny_mc"]["num_fewshot"] == 0
    assert limited["tasks"]["tiny_mc"]["acc"] == pytest.approx(accuracy(scores, 5)[0], abs=1e-12)

    # The caller's objects are left as they were: lm-eval sets a pad token and seeds the global generators.
    assert char_tokenizer.pad_token is None and not tiny_llama.training
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_cli_prints_matching_json(tiny_folder, tiny_llama, task_yaml, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_folder, "--tasks", task_yaml, "--json", "--device", "cpu",
                             "--quiet")
    assert code == 0, err
    result = json.loads(out)  # one JSON object, nothing else on stdout
    assert result["model"] == str(tiny_folder) and result["limit"] is None
    acc, acc_norm = accuracy(choice_scores(tiny_llama))
    assert result["tasks"]["tiny_mc"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["tasks"]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert "%" not in err and "it/s" not in err, f"--quiet printed progress: {err!r}"


def test_cli_table_and_limit(tiny_folder, tiny_llama, task_yaml, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_folder, "--tasks", task_yaml, "--limit", "4", "--device", "cpu",
                             "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    acc_row, norm_row = lines[1].split(), lines[2].split()
    assert acc_row[:2] == ["tiny_mc", "acc"] and norm_row[0] == "acc_norm"
    assert float(acc_row[2]) == pytest.approx(accuracy(choice_scores(tiny_llama), 4)[0], abs=1e-4)
    assert "first 4 documents" in out


GROUP_YAML = """\
group: tiny_suite
task: [tiny_a]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


def test_folder_runs_its_groups_and_tasks(tmp_path, tiny_llama, char_tokenizer, lm_eval):
    from sparsekern.tasks import format_table, load_tasks, zero_shot

    folder = tmp_path / "suite"
    write_task(folder, "tiny_a")
    write_task(folder / "more", "tiny_b")
    assert sorted(load_tasks(str(folder), progress=False).names) == ["tiny_a", "tiny_b"]
    assert load_tasks(f"{folder / 'more'},{folder / 'tiny_a.yaml'}", progress=False).names == ["tiny_b", "tiny_a"]

    (folder / "suite.yaml").write_text(GROUP_YAML)  # a group there is run as one, its tasks once
    task_set = load_tasks(str(folder), progress=False)
    assert task_set.names == ["tiny_suite", "tiny_b"]
    result = zero_shot(tiny_llama, char_tokenizer, task_set, limit=3, progress=False)
    assert sorted(result["tasks"]) == ["tiny_a", "tiny_b"] and list(result["groups"]) == ["tiny_suite"]
    assert result["groups"]["tiny_suite"]["acc"] == pytest.approx(result["tasks"]["tiny_a"]["acc"])
    assert "tiny_suite" in format_table(result)


def test_without_lm_eval_says_how_to_install(monkeypatch, tiny_folder, tiny_llama, char_tokenizer, capsys):
    from sparsekern.tasks import zero_shot

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    with pytest.raises(ValueError, match=r"lm-evaluation-harness.*pip install 'sparsekern\[tasks\]'"):
        zero_shot(tiny_llama, char_tokenizer, "piqa")
    code, out, err = run_cli(capsys, "eval", tiny_folder, "--tasks", "piqa", "--device", "cpu", "--quiet")
    assert code == 2 and out == ""
    assert err.startswith("sparsekern eval: error: zero-shot tasks need lm-evaluation-harness")
    assert "pip install 'sparsekern[tasks]'" in err and len(err.strip().splitlines()) == 1


def test_unknown_task_lists_the_local_alternative(monkeypatch, tmp_path, tiny_folder, lm_eval, capsys):
    from lm_eval.tasks import TaskManager

    from sparsekern import tasks

    # lm-eval's own ~15k built-in tasks take ~15 s to index; a small index stands in for them here (the slow test
    # below uses the real one).
    stand_in = TaskManager(include_path=str(write_task(tmp_path / "builtin").parent), include_defaults=False)
    monkeypatch.setattr(tasks, "_builtin_manager", lambda folders: stand_in)
    with pytest.raises(ValueError, match=r"unknown task 'tiny_mx' \(did you mean tiny_mc\?\): not an lm-eval task, "
                                         r"nor a task YAML file or folder; .*path of a task YAML"):
        tasks.load_tasks("tiny_mx")
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--tasks", "tiny_mx", "--device", "cpu")
    assert code == 2 and err.startswith("sparsekern eval: error: unknown task 'tiny_mx'")
    assert "dataset_path is json" in err and len(err.strip().splitlines()) == 1


def test_hub_dataset_offline_names_the_task(tmp_path, tiny_folder, lm_eval, capsys):
    from sparsekern.tasks import load_tasks

    # conftest sets HF_DATASETS_OFFLINE=1: the hub is unreachable, as on our machines.
    hub_task = write_task(tmp_path, "hub_mc", dataset_path="sparsekern-test/no-such-dataset")
    with pytest.raises(ValueError, match=r"task 'hub_mc' \(.*hub_mc.yaml\) needs the Hugging Face dataset "
                                         r"'sparsekern-test/no-such-dataset', which could not be reached .*"
                                         r"pass a local task file instead"):
        load_tasks(str(hub_task), progress=False)
    code, out, err = run_cli(capsys, "eval", tiny_folder, "--tasks", hub_task, "--device", "cpu", "--quiet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("sparsekern eval: error: task 'hub_mc'")


def test_local_data_and_argument_errors(tmp_path, tiny_folder, tiny_llama, char_tokenizer, lm_eval, capsys):
    from sparsekern.tasks import load_tasks, zero_shot

    missing_data = write_task(tmp_path, "lost_mc", data=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"task 'lost_mc' \(.*\): could not load its dataset 'json': "
                                         r"FileNotFoundError: .*missing.jsonl"):
        load_tasks(str(missing_data), progress=False)
    with pytest.raises(ValueError, match=r"task file .*nowhere.yaml: no such file or folder"):
        load_tasks(str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ValueError, match=r"no tasks given"):
        load_tasks(" , ")
    with pytest.raises(ValueError, match=r"limit must be a positive number"):
        zero_shot(tiny_llama, char_tokenizer, str(missing_data), limit=0)
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--limit", "3", "--device", "cpu")
    assert code == 2 and "--limit applies to --tasks" in err
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--tasks", missing_data, "--limit", "0", "--device", "cpu")
    assert code == 2 and "--limit must be a positive number" in err


@pytest.mark.slow
def test_builtin_tasks_offline(lm_eval):
    """lm-eval's real index: piqa is known but its hub dataset is unreachable offline; a typo gets suggestions."""
    from sparsekern.tasks import load_tasks

    with pytest.raises(ValueError, match=r"task 'piqa' needs the Hugging Face dataset '[^']+piqa', which could not "
                                         r"be reached .*pass a local task file instead"):
        load_tasks("piqa", progress=False)
    with pytest.raises(ValueError, match=r"unknown task 'arc_eazy' \(did you mean arc_easy"):
        load_tasks("arc_eazy")
