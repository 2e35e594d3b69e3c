"""Output off a terminal (a log file, a pipe, CI): one message a line, no carriage-return bars, no library bars."""

import os
import subprocess
import sys

from helpers import REPO
from milora_cli import runlog, terminal

LONG = "data: 1200 training examples (0 truncated to 64 tokens, 0 dropped as all-prompt), 150 validation, " * 2


def test_a_message_longer_than_80_columns_stays_one_line_off_a_terminal(capsys):
    console = terminal.console()  # capsys's stdout is not a terminal, as a log file is not
    assert not console.is_terminal and console.width == 80  # rich's width off a terminal: it used to wrap there
    console.print(LONG)
    assert capsys.readouterr().out == LONG + "\n"


def test_progress_and_status_off_a_terminal_print_lines_without_carriage_returns(capsys):
    console = terminal.console()
    with terminal.working(console, "loading a model"):
        console.print("inside the step")
    with runlog.Progress(console, total=3, start_step=0, enabled=True) as progress:
        for step in (1, 2, 3):
            progress.update(step, {"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0})
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # no animation, no cursor movement
    lines = out.splitlines()
    assert lines[:2] == ["loading a model ...", "inside the step"]
    assert [line for line in lines if line.startswith("step ")] == [
        f"step {step}: loss {1.0 / step:.4f}  lr 1.00e-03  100 tok/s" for step in (1, 2, 3)
    ]
    assert lines[-1].startswith("train") and "3/3" in lines[-1]  # the bar once, as it ended


def test_dry_run_piped_to_a_file_has_each_message_on_one_line(tmp_path, tiny_model_dir):
    log = tmp_path / "dry-run.log"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "COLUMNS")}
    with log.open("w") as handle:  # `milora train ... --dry-run > dry-run.log 2>&1`
        result = subprocess.run(
            [sys.executable, "-m", "milora_cli", "train", "recipes/quickstart.yaml", "--dry-run", f"model.name_or_path={tiny_model_dir}",
             f"output.dir={tmp_path / 'never-written'}"],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=600,
        )
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "Loading weights" not in text  # transformers' tqdm bar is off
    lines = text.splitlines()
    data = next(line for line in lines if line.startswith("data: "))
    assert len(data) > 80 and data.endswith("validation")  # longer than rich's 80 columns, whole on its line
    assert f"loading {tiny_model_dir} ..." in lines
    assert any(line.startswith("adapters on ") and line.endswith("%)") for line in lines)
    assert lines[-1] == "dry run: nothing trained, nothing written"
