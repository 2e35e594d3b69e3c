"""`milora eval`: answer extraction on real records, prompts equal to training's, token loss, resume, hooks."""

import copy
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helpers import REPO, milora
from milora_cli import models
from milora_cli.evaluation import answers, generate, suite, tasks
from milora_cli.data import records
from milora_cli.errors import EvalError, RecipeError
from milora_cli.recipe import eval_settings, validate

QUIET = Console(quiet=True)


def real_items(task_name: str, shared_data: Path, n: int = 40) -> list[tasks.Item]:
    return tasks.load_items(tasks.TASKS[task_name], str(shared_data), n)


# --- extraction on real records ---------------------------------------------------------------------

@pytest.mark.parametrize("name", tasks.COMMONSENSE)
def test_commonsense_extraction_on_real_records(name, shared_data):
    items = real_items(name, shared_data)
    labels = answers.CHOICE_PATTERNS[name].split("|")
    for item in items:
        other = next(label for label in labels if label != item.gold)
        def score(text, gold=item.gold):
            return tasks.score(tasks.TASKS[name], text, gold)
        assert score(f"the correct answer is {item.gold}") == (item.gold, True)  # the training target
        assert score(f"the correct answer is {item.gold}, not {other}") == (item.gold, True)  # first wins
        assert score(f"{other}? no: the correct answer is {item.gold}") == (other, False)
        assert score("I am not sure which one it is.") == (None, False)  # no answer: wrong
        # Case-sensitive, as the reference: "True" / "Answer1" are not the answers true / answer1.
        assert score(f"The correct answer is {item.gold.upper()}") == (None, False)
        assert score(f"The correct answer is {item.gold.capitalize()}") == (None, False)
        # Only the response counts: an echoed next prompt after "### Response:" is ignored.
        assert score(f"hmm\n\n### Response:\nthe correct answer is {item.gold}") == (None, False)
    assert len({item.gold for item in items}) > 1  # the records really vary


def test_gsm8k_extraction_on_real_records(shared_data):
    raw = [json.loads(line) for line in (shared_data / "math/gsm8k_test.jsonl").read_text().splitlines()]
    items = real_items("gsm8k", shared_data, None)
    assert any("," in record["answer"].rpartition("####")[2] for record in raw)  # golds like 2,125 exist
    gsm8k = tasks.TASKS["gsm8k"]
    for record, item in zip(raw, items, strict=True):
        target = records.normalize_record(record, "gsm8k").output  # what training teaches: "... The answer is: N"
        assert tasks.score(gsm8k, target, item.gold) == (item.gold, True)
    item, gold = items[0], items[0].gold
    with_commas = f"{int(gold):,}"
    assert tasks.score(gsm8k, f"So the total is x.\nThe answer is: {with_commas}", gold)[1]
    assert tasks.score(gsm8k, f"The answer is: ${gold}.00", gold)[1]  # compared numerically
    assert tasks.score(gsm8k, f"The answer is: {gold} or {int(gold) + 1}", gold)[1]  # first number wins
    assert not tasks.score(gsm8k, f"The answer is: {int(gold) + 1} or {gold}", gold)[1]
    assert tasks.score(gsm8k, f"The answer is: 7\nNo wait. The answer is: {gold}", gold)[1]  # MetaMath: last marker
    assert tasks.score(gsm8k, f"The answer is: {gold}\n\n### Instruction:\nThe answer is: 7", gold)[1]  # stop string
    assert tasks.score(gsm8k, f"#### {gold}\nThe answer is {gold}.", gold) == (None, False)  # no marker
    assert tasks.score(gsm8k, f"THE ANSWER IS: {gold}", gold) == (None, False)  # case-sensitive marker
    assert answers.extract_number("The answer is: 7/2") == "4" and answers.extract_number("The answer is: 5/0") == "5"


@pytest.mark.parametrize("name", ["math", "math500"])
def test_math_gold_is_the_last_balanced_box_of_real_solutions(name, shared_data):
    file = tasks.TASKS[name].local
    raw = [json.loads(line) for line in (shared_data / file).read_text().splitlines()]
    items = real_items(name, shared_data, None)
    nested = [item.gold for item in items if "{" in item.gold]
    assert len(nested) > 50 and all(gold.count("{") == gold.count("}") for gold in nested)
    if name == "math500":  # this file also gives the answer: the boxed gold agrees after normalisation
        assert all(answers.math_equal(record["answer"], item.gold) for record, item in zip(raw, items, strict=True))
    math_task = tasks.TASKS[name]
    for item in items[:200]:
        assert tasks.score(math_task, f"So we get this.\nThe answer is: {item.gold}.\nDone", item.gold) == (item.gold, True)
        assert tasks.score(math_task, f"The answer is: 0\nThe answer is: {item.gold}", item.gold)[1]  # last marker
        assert tasks.score(math_task, "I cannot solve it.", item.gold) == (None, False)
    first = items[0].gold
    assert not tasks.score(math_task, f"The ANSWER is: {first}", first)[1]


@pytest.mark.parametrize("prediction, gold", [
    ("\\dfrac{1}{2}", "\\frac12"), ("0.5", "\\frac{1}{2}"), ("1/2", "\\tfrac{1}{2}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("90^\\circ", "90"), ("\\$5", "5"), ("10 \\text{ cm}", "10"), ("\\text{(C)}", "(C)"), ("x = 5", "5"), ("\\sqrt2", "\\sqrt{2}"),
    ("$.5$", "\\frac{1}{2}"), ("50\\%", "50"), ("\\!1,\\!000", "1,000"),
])
def test_math_normalisation_equates_the_usual_variants(prediction, gold):
    assert answers.math_equal(prediction, gold)


@pytest.mark.parametrize("prediction, gold", [("\\frac{1}{3}", "\\frac{1}{2}"), ("x^2", "x^3"), ("(1,2)", "[1,2]"), ("12", "1,2")])
def test_math_normalisation_keeps_different_answers_apart(prediction, gold):
    assert not answers.math_equal(prediction, gold)


def test_last_boxed_balances_braces():
    assert answers.last_boxed("so $\\boxed{1}$ and then $\\boxed{\\frac{a}{b^{2}}}$.") == "\\frac{a}{b^{2}}"
    assert answers.last_boxed("$\\boxed 5$") == "5" and answers.last_boxed("\\fbox{7}") == "7"
    assert answers.last_boxed("no box here") is None and answers.last_boxed("\\boxed{1 + {2}") is None


# --- prompts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*tasks.COMMONSENSE, "gsm8k", "math500"])
def test_prompts_are_the_training_prompts(name, shared_data, smol_tokenizer):
    for item in real_items(name, shared_data, 5):
        training = item.prompt.removesuffix(tasks.MATH_CUE)
        assert training.endswith("### Response:\n") and (item.prompt == training) == (name in tasks.COMMONSENSE)
        train_ids = smol_tokenizer(training)["input_ids"]
        assert smol_tokenizer(item.prompt)["input_ids"][: len(train_ids)] == train_ids  # an exact token prefix
    if name == "gsm8k":  # the very prompt training masks for this record
        record = json.loads((shared_data / "math/gsm8k_test.jsonl").read_text().splitlines()[0])
        first = real_items(name, shared_data, 1)[0]
        assert first.prompt == records.prompt_for_generation(records.normalize_record(record, "gsm8k")) + tasks.MATH_CUE


# --- the model side on a tiny model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(tiny_model_dir, "fp32"), models.load_tokenizer(tiny_model_dir)


def test_window_losses_equal_the_model_loss_and_ignore_padding(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    windows = [torch.randint(0, 1000, (n,)).tolist() for n in (40, 40, 17)]
    batched = generate.window_losses(model, windows, tokens_per_batch=120)  # one padded batch of three
    for window, (nll, count) in zip(windows, batched, strict=True):
        ids = torch.tensor([window])
        reference = model(input_ids=ids, labels=ids).loss.item()
        # float32, as transformers' loss upcasts to: a mean of <= 39 token losses, each a log-sum-exp over 49152 logits
        # (error ~ log2(49152) 2^-24 ~ 1e-6 relative), padded (one batch) against alone (one window): 1e-5 bounds both.
        assert count == len(window) - 1 and nll / count == pytest.approx(reference, rel=1e-5)


def test_beams_and_greedy_both_generate_one_text_per_prompt(tiny):
    model, tokenizer = tiny
    prompts = [records.format_prompt(f"Count to {n}.") for n in range(3)]
    for beams in (1, 2):
        outputs = generate.generate(model, tokenizer, prompts, 6, 2, num_beams=beams, stop_strings=("Response",))
        assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)


def tiny_data_dir(root: Path, n: int = 40) -> Path:
    """A --data-dir with a boolq-style set and a WikiText text, made up (the real files are not needed)."""
    folder = root / "data"
    (folder / "commonsense/boolq").mkdir(parents=True)
    records = [{"instruction": f"Is {i} even?\n\nAnswer format: true/false", "input": "", "answer": ["true", "false"][i % 2],
                "output": f"the correct answer is {['true', 'false'][i % 2]}"} for i in range(n)]
    (folder / "commonsense/boolq/test.json").write_text(json.dumps(records))
    (folder / "wikitext2").mkdir()
    (folder / "wikitext2/test.txt").write_text(" = Heading = \n" + "The cat sat on the mat . " * 200)
    return folder


def eval_cfg(data_dir: Path, **values):
    return eval_settings({"tasks": ["boolq", "wikitext"], "data_dir": str(data_dir), "batch_size": 3,
                          "choice_max_new_tokens": 4, "ppl_window": 64, **values})


def read_results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / suite.RESULTS_FILE).read_text().splitlines()]


def test_a_torn_results_file_resumes_to_each_example_exactly_once(tiny, tmp_path):
    model, tokenizer = tiny
    cfg, out = eval_cfg(tiny_data_dir(tmp_path), limit=10), tmp_path / "out"
    whole = suite.evaluate_model(model, tokenizer, cfg, out, "tiny", QUIET)
    reference = {(r["task"], r["id"]): r for r in read_results(out)}
    lines = (out / suite.RESULTS_FILE).read_text().splitlines(keepends=True)
    # A crash mid-append: some batches written, the last line cut half-way.
    (out / suite.RESULTS_FILE).write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    resumed = suite.evaluate_model(model, tokenizer, cfg, out, "tiny", QUIET)
    records = read_results(out)
    keys = [(r["task"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == len(reference) == 20  # 10 questions, 10 windows
    assert {key: r for key, r in zip(keys, records, strict=False)} == reference  # greedy: the same generations again
    assert resumed == whole and resumed["tasks"]["boolq"]["examples"] == 10


def test_a_killed_eval_resumes_to_each_example_exactly_once(tiny_model_dir, tmp_path):
    data_dir, out = tiny_data_dir(tmp_path, n=150), tmp_path / "out"
    command = [sys.executable, "-m", "milora_cli", "eval", tiny_model_dir, "--tasks", "boolq", "--data-dir", str(data_dir),
               "--batch-size", "1", "--output", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    results, deadline = out / suite.RESULTS_FILE, time.time() + 300
    while not (results.is_file() and results.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    scored_before = results.read_text().count("\n")
    assert 3 <= scored_before < 150  # killed mid-way
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(150)]  # complete, each exactly once


def test_an_output_folder_of_other_settings_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    data_dir, out = tiny_data_dir(tmp_path), tmp_path / "out"
    suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=2), out, "tiny", QUIET)
    with pytest.raises(EvalError, match="num_beams"):
        suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=2, num_beams=2), out, "tiny", QUIET)
    with pytest.raises(EvalError, match="model"):
        suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=2), out, "another model", QUIET)


def test_a_folder_asked_through_another_chat_template_is_refused_and_one_from_before_the_key_resumes(tiny, tmp_path):
    """--prompt chat asks through the tokenizer's template, so the template is a setting (its sha256): a base whose
    template changed (another hub revision, an edited chat_template.jinja) does not mix its prompts into a folder.
    A folder written before `prompt` and `chat_template` were kept was scored with the Alpaca prompt and resumes so."""
    from test_chat_template_follows import ZEPHYR_TEMPLATE

    model, tokenizer = tiny
    data_dir, out, before = tiny_data_dir(tmp_path), tmp_path / "chat", tmp_path / "before"
    suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=2, tasks=["boolq"], prompt="chat"), out, "tiny", QUIET)
    kept = json.loads((out / suite.SETTINGS_FILE).read_text())["chat_template"]
    assert kept == "sha256:" + hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    zephyr = copy.deepcopy(tokenizer)
    zephyr.chat_template = ZEPHYR_TEMPLATE
    with pytest.raises(EvalError, match="chat_template"):
        suite.evaluate_model(model, zephyr, eval_cfg(data_dir, limit=3, tasks=["boolq"], prompt="chat"), out, "tiny", QUIET)
    assert len(read_results(out)) == 2  # nothing scored into it
    suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=2, tasks=["boolq"]), before, "tiny", QUIET)
    saved = json.loads((before / suite.SETTINGS_FILE).read_text())
    assert saved["chat_template"] is None and saved["prompt"] == "alpaca"
    (before / suite.SETTINGS_FILE).write_text(json.dumps({k: v for k, v in saved.items() if k not in ("prompt", "chat_template")}))
    with pytest.raises(EvalError, match="other settings"):  # it was scored with the Alpaca prompt, not through a template
        suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=3, tasks=["boolq"], prompt="chat"), before, "tiny", QUIET)
    summary = suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=3, tasks=["boolq"]), before, "tiny", QUIET)
    assert summary["tasks"]["boolq"]["examples"] == 3 and len(read_results(before)) == 3  # resumed: 2 kept, 1 scored


def test_chat_prompts_ask_each_question_as_one_user_turn_through_the_chat_template(tiny, tmp_path):
    model, tokenizer = tiny
    data_dir, out = tiny_data_dir(tmp_path), tmp_path / "chat"

    def asked(question: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)

    suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=3, tasks=["boolq"], prompt="chat"), out, "tiny", QUIET)
    questions = json.loads((data_dir / "commonsense/boolq/test.json").read_text())
    scored = read_results(out)
    assert len(scored) == 3 and all(r["prompt"] == asked(questions[int(r["id"])]["instruction"]) for r in scored)
    assert scored[0]["prompt"].endswith("<|im_start|>assistant\n")  # SmolLM2's ChatML, the generation prompt last
    with pytest.raises(EvalError, match="prompt"):  # scores of another prompt are not mixed into the folder
        suite.evaluate_model(model, tokenizer, eval_cfg(data_dir, limit=3, tasks=["boolq"]), out, "tiny", QUIET)
    chat_prompt = tasks.prompter("chat", tokenizer)
    gsm8k = tasks._gsm8k_item({"question": "Two and three?", "answer": "2+3=5\n#### 5"}, 0, "gsm8k", chat_prompt)
    assert gsm8k.prompt == asked("Two and three?") + tasks.MATH_CUE  # the cue opens the assistant's answer
    assert chat_prompt("Add.", "2 and 3") == asked("Add.\n\n2 and 3")


def test_summary_scores_the_selected_examples_and_averages_commonsense():
    records = [{"task": "boolq", "id": str(i), "correct": i < 3} for i in range(4)]
    records += [{"task": "piqa", "id": "0", "correct": False}, {"task": "piqa", "id": "9", "correct": True}]
    records += [{"task": "wikitext", "id": "0", "nll": 6.0, "tokens": 3}, {"task": "wikitext", "id": "1", "nll": 2.0, "tokens": 1}]
    summary = suite.summarise(records, {"boolq": {"0", "1", "2", "3"}, "piqa": {"0"}, "wikitext": {"0", "1"}})
    assert summary["tasks"]["boolq"]["accuracy"] == 0.75 and summary["tasks"]["piqa"]["examples"] == 1
    assert summary["commonsense_average"] == {"accuracy": 0.375, "sets": 2}
    assert summary["tasks"]["wikitext"]["loss"] == 2.0 and summary["tasks"]["wikitext"]["ppl"] == pytest.approx(math.e**2)
    header, rows = suite.table_rows({"a": summary, "b": summary})
    assert header == ["task", "a", "b"] and [row[0] for row in rows][:3] == ["boolq (n=4)", "piqa (n=1)", "commonsense average (2 of 8)"]


def test_unknown_tasks_and_bad_values_are_one_line_errors():
    with pytest.raises(RecipeError, match="tasks"):
        eval_settings({"tasks": ["boolk"]})
    with pytest.raises(RecipeError, match="limit"):
        eval_settings({"tasks": ["boolq"], "limit": 0})
    result = subprocess.run([sys.executable, "-m", "milora_cli", "eval", "smollm2-135m", "--tasks", "boolk"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "boolk" in result.stderr and "Traceback" not in result.stderr


# --- runs: base + adapter unmerged, and the recipe's eval section -------------------------------------

def test_a_run_dir_scores_like_its_merged_folder_and_the_recipe_eval_runs_after_training(tiny_model_dir, tiny_data, tmp_path):
    from milora_cli.merge import merge
    from milora_cli.training.train import train

    data_dir = tiny_data_dir(tmp_path)
    run_dir = tmp_path / "run"
    recipe = validate({
        "model": {"name_or_path": tiny_model_dir},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": tiny_data, "val_size": 8, "max_length": 64},
        "train": {"max_steps": 2, "lr": 5e-2, "warmup_steps": 0, "eval_every": 1},
        "output": {"dir": str(run_dir)},
        "eval": {"tasks": ["boolq", "wikitext"], "data_dir": str(data_dir), "limit": 3, "every": 1, "ppl_window": 64,
                 "choice_max_new_tokens": 4},
    })
    summary = train(recipe, QUIET)
    assert summary["benchmarks"]["boolq"]["examples"] == 3 and summary["benchmarks"]["wikitext"]["windows"] == 3
    assert (run_dir / "eval/step-000001/summary.json").is_file() and not (run_dir / "eval/step-000002").exists()
    assert json.loads((run_dir / "summary.json").read_text())["benchmarks"] == summary["benchmarks"]
    # The run dir (base + adapter, unmerged) and its merged folder are the same model.
    merge(run_dir, tmp_path / "merged")
    unmerged, _, identity = suite.load(str(run_dir), None, "cpu", QUIET)
    merged, _, _ = suite.load(str(tmp_path / "merged"), None, "cpu", QUIET)
    ids = torch.randint(0, 1000, (2, 12))
    # W' = W + dW rounded once to float32 against W x + s (B A - B0 A0) x in float32: ~1e-6 of the logits (see
    # test_export.FP32_EXPORT); 1e-4 only asks "the same model", the exact comparisons are test_export's.
    assert torch.allclose(unmerged(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert "milora r=4, step 2" in identity
    base = models.load_model(tiny_model_dir, "fp32")
    assert not torch.allclose(unmerged(ids).logits, base(ids).logits, atol=1e-4)  # the adapter really trained


@pytest.mark.slow
def test_milora_eval_on_the_real_model_writes_results_and_summary(smollm2_path, shared_data, tmp_path):
    out = tmp_path / "eval"
    # the timeout guards against a hang only: 6 min on 2 shared cores at load 4, over 15 beside a quickstart
    result = milora("eval", "smollm2-135m", "--tasks", "boolq,gsm8k,wikitext", "--limit", "4",
                    "--data-dir", str(shared_data), "--output", str(out), timeout=2400)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_results(out)
    assert sorted((r["task"], r["id"]) for r in records) == sorted((t, str(i)) for t in ("boolq", "gsm8k", "wikitext") for i in range(4))
    assert all(set(r) >= {"task", "id", "prompt", "generation", "prediction", "gold", "correct"} for r in records)
    summary = json.loads((out / suite.SUMMARY_FILE).read_text())
    assert 1.0 < summary["tasks"]["wikitext"]["loss"] < 6.0  # a real LM on English text, 1024-token windows
    assert summary["settings"]["window"] == 1024 and summary["tasks"]["wikitext"]["tokens"] == 4 * 1023
