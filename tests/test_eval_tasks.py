"""`eval --tasks`: the lm-eval backend on self-written multiple-choice items (a local JSONL task), the
paper presets and published numbers, the paired comparison, and the errors. Offline."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mlx_openelm import load
from mlx_openelm.errors import OptionError
from mlx_openelm.evaluation.compare import compare_samples, paired_stderr
from mlx_openelm.evaluation.scoring import encode_pair, score
from mlx_openelm.evaluation.tasks import (
    PRESETS,
    PUBLISHED,
    check_published,
    check_task_names,
    parse_tasks,
    published_model,
)

ITEMS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a cat have?", ["two", "four", "six", "eight legs in all"], 1),
    ("What do bees make?", ["milk", "honey", "bread", "glass"], 1),
    ("Which is the largest planet?", ["Mars", "Earth", "Jupiter", "Venus"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand", "smoke"], 1),
    ("Where do fish live?", ["in trees", "in water", "in the desert", "in the sky"], 1),
    ("Is fire hot?", ["yes", "no"], 0),
]

TASK_YAML = """task: mini_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "mini_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in ITEMS))
    (folder / "mini_mc.yaml").write_text(TASK_YAML.format(data=data))
    return folder


@pytest.fixture(autouse=True)
def datasets_offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets-cache"))


@pytest.fixture(scope="module", params=["tiny", "trained"])
def model_and_tokenizer(request):
    if request.param == "tiny":
        return request.getfixturevalue("loaded")
    return load(request.getfixturevalue("trained_model_path"), dtype="float32")


def expected_accuracy(model, tokenizer):
    """acc and acc_norm (log-likelihood over the choice's characters) from unbatched scores."""
    acc, acc_norm, logprobs = [], [], []
    for question, choices, gold in ITEMS:
        scores = [s for s, _ in score(model, tokenizer, [(f"Question: {question}\nAnswer:", f" {c}") for c in choices],
                                      batch_size=1, share_prefixes=False)]
        logprobs.append(scores)
        acc.append(float(np.argmax(scores) == gold))
        acc_norm.append(float(np.argmax([s / len(c) for s, c in zip(scores, choices)]) == gold))
    return np.mean(acc), np.mean(acc_norm), logprobs


def run_local(lm, task_dir, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=["mini_mc"], log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   **kwargs)


def test_lm_eval_runs_our_backend_to_the_unbatched_numbers(model_and_tokenizer, task_dir):
    pytest.importorskip("lm_eval")
    from mlx_openelm.evaluation.lm_eval_backend import OpenELMLM

    model, tokenizer = model_and_tokenizer
    acc, acc_norm, logprobs = expected_accuracy(model, tokenizer)
    results = {}
    for share in (True, False):
        out = run_local(OpenELMLM(model, tokenizer, share_prefixes=share), task_dir)
        results[share] = out
        metrics = out["results"]["mini_mc"]
        assert metrics["acc,none"] == pytest.approx(acc, abs=1e-12)
        assert metrics["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)
        for sample in out["samples"]["mini_mc"]:
            got = [r[0] for r in sample["filtered_resps"]]
            assert np.allclose(got, logprobs[sample["doc_id"]], atol=1e-4)
    shared, plain = (results[s]["samples"]["mini_mc"] for s in (True, False))
    assert [s["acc"] for s in shared] == [s["acc"] for s in plain]


def test_our_encoding_is_lm_evals(loaded):
    pytest.importorskip("lm_eval")
    from mlx_openelm.evaluation.lm_eval_backend import OpenELMLM

    model, tokenizer = loaded
    lm = OpenELMLM(model, tokenizer)
    for context, continuation in [("Answer:", " yes"), ("Answer: ", "yes"), ("a  \n ", "b c"), ("x", "y")]:
        assert lm._encode_pair(context, continuation) == encode_pair(tokenizer, context, continuation)
    assert lm.prefix_token_id == tokenizer.eos_id
    assert OpenELMLM(model, tokenizer, empty_context="bos").prefix_token_id == tokenizer.bos_id


def test_the_response_cache_answers_a_second_run(loaded, task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from mlx_openelm.evaluation.lm_eval_backend import OpenELMLM

    model, tokenizer = loaded
    first = run_local(OpenELMLM(model, tokenizer), task_dir, use_cache=str(tmp_path / "cache"))
    idle = OpenELMLM(model, tokenizer)
    second = run_local(idle, task_dir, use_cache=str(tmp_path / "cache"))
    assert idle.scored == 0  # every answer came from the cache
    assert second["results"]["mini_mc"]["acc,none"] == first["results"]["mini_mc"]["acc,none"]


def test_generate_until_stops_before_the_stop_text(trained_model_path):
    from mlx_openelm import generate
    from mlx_openelm.evaluation.requests import generate_until

    model, tokenizer = load(trained_model_path, dtype="float32")
    prompt = "The capital of France is"
    full = generate(model, tokenizer, tokenizer.encode(prompt, add_bos=True), max_tokens=12)
    stop = full.strip()[3:6]
    text = generate_until(model, tokenizer, prompt, until=[stop], max_gen_toks=12)
    assert stop not in text and full.startswith(text) and len(text) < len(full)


# ---- the command -----------------------------------------------------------------------------------

def test_eval_tasks_json_and_a_reference(invoke_cli, hf_checkpoint, loaded, task_dir):
    pytest.importorskip("lm_eval")
    acc, acc_norm, _ = expected_accuracy(*loaded)
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "mini_mc", "--include-path", task_dir,
                        "--reference", hf_checkpoint, "--json", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tasks"]["mini_mc"]["metrics"]["acc"][0] == pytest.approx(acc)
    assert report["tasks"]["mini_mc"]["metrics"]["acc_norm"][0] == pytest.approx(acc_norm)
    assert report["requests"] == sum(len(c) for _, c, _ in ITEMS) and report["truncated"] == 0
    paired = {r["metric"]: r for r in report["reference"]}
    assert paired["acc"]["difference"] == 0 and paired["acc"]["changed"] == 0
    assert paired["acc"]["items"] == len(ITEMS) and abs(paired["acc"]["gold_logprob_change"]) < 1e-5


def test_a_malformed_task_file_is_named_with_its_line(invoke_cli, hf_checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\nmetric_list: 3\n")
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "bad", "--include-path", tmp_path)
    assert result.exit_code == 1 and f"{tmp_path / 'bad.yaml'}:" in result.output
    assert "not valid YAML" in result.output and "Traceback" not in result.output


def test_a_malformed_data_line_is_named(invoke_cli, hf_checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a", "choices": ["b"], "gold": 0}\n{"question": oops}\n')
    (tmp_path / "t.yaml").write_text(TASK_YAML.format(data=data).replace("mini_mc", "t"))
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "t", "--include-path", tmp_path)
    assert result.exit_code == 1 and f"{data}:2: not a JSON object" in result.output


def test_without_lm_eval_the_error_says_what_to_install(invoke_cli, hf_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "arc_easy")
    assert result.exit_code == 1 and 'pip install "mlx-openelm[eval]"' in result.output


def test_text_or_tasks_not_both(invoke_cli, hf_checkpoint, tmp_path):
    (tmp_path / "t.txt").write_text("hello there")
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "x", "--text", tmp_path / "t.txt")
    assert result.exit_code == 2 and "either --text" in result.output


# ---- the library's pieces ----------------------------------------------------------------------------

def test_unknown_task_names_list_close_ones():
    with pytest.raises(OptionError, match=r"unknown task 'hellaswg'; close names: hellaswag"):
        check_task_names(["arc_easy", "hellaswg"], ["arc_easy", "hellaswag", "piqa"])
    check_task_names(["arc_*"], ["arc_easy"])  # lm-eval expands patterns itself


def test_presets_parse_and_carry_one_number_per_task():
    names, preset = parse_tasks("paper-openllm")
    assert preset == "paper-openllm" and names == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande"]
    assert parse_tasks(" arc_easy, piqa ") == (["arc_easy", "piqa"], None)
    with pytest.raises(OptionError, match="runs alone"):
        parse_tasks("paper-zeroshot,piqa")
    for numbers in PUBLISHED.values():
        assert all(len(numbers[p]) == len(PRESETS[p]) for p in PRESETS)
    # the card's averages, recomputed from its rounded cells (research note §1.4)
    assert np.mean(PUBLISHED["OpenELM-270M"]["paper-zeroshot"]) == pytest.approx(54.37, abs=0.01)
    assert np.mean(PUBLISHED["OpenELM-1_1B"]["paper-openllm"]) == pytest.approx(45.93, abs=0.01)
    assert np.mean(PUBLISHED["OpenELM-3B-Instruct"]["paper-llm360"]) == pytest.approx(55.73, abs=0.01)


def test_the_published_checkpoint_is_known_by_architecture(loaded):
    from mlx_openelm.config import preset_args

    assert published_model(preset_args("270M")) == "OpenELM-270M"
    assert published_model(preset_args("3B", vocab_size=32128)) == "OpenELM-3B"
    assert published_model(loaded[0].args) is None
    assert check_published("openelm-450m-instruct") == "OpenELM-450M-Instruct"
    with pytest.raises(OptionError, match="no published numbers for 'OpenELM-7B'"):
        check_published("OpenELM-7B")


def test_paired_comparison_arithmetic():
    model = [{"doc_id": i, "acc": a, "target": 0, "filtered_resps": [(l0, False), (-1.0, False)]}
             for i, (a, l0) in enumerate([(1, -0.5), (0, -2.0), (1, -0.1), (0, -3.0)])]
    reference = [{"doc_id": i, "acc": a, "target": 0, "filtered_resps": [(l0, False), (-1.0, False)]}
                 for i, (a, l0) in enumerate([(1, -0.6), (1, -0.9), (1, -0.2), (0, -2.0)])]
    result = compare_samples("t", "acc", model, reference)
    assert result.items == 4 and result.model == 0.5 and result.reference == 0.75
    assert result.difference == -0.25
    assert result.stderr == pytest.approx(paired_stderr([0, -1, 0, 0])) == pytest.approx(0.25)
    assert result.changed == 0.25  # item 1 changed its answer
    assert result.gold_logprob_change == pytest.approx((0.1 - 1.1 + 0.1 - 1.0) / 4)


def test_ctrl_c_prints_the_finished_tasks(invoke_cli, hf_checkpoint, task_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from mlx_openelm.evaluation import harness

    def interrupted(lm, shots, done=None, **kwargs):
        done.metrics["mini_mc"] = {"acc,none": 0.5, "acc_stderr,none": 0.1}
        done.shots["mini_mc"] = 0
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_tasks", interrupted)
    result = invoke_cli("eval", "--model", hf_checkpoint, "--tasks", "mini_mc", "--include-path", task_dir)
    assert result.exit_code == 130
    assert "mini_mc" in result.stdout and "acc 50.00 ± 10.00" in result.stdout
    assert "interrupted (--model): 1 task(s) finished" in result.stderr
