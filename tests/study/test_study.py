"""The study (`python -m hycam.study`) and its report on a tiny Llama: the sweep picks, extends and reuses runs,
reruns skip, seeds share the split and data order, retention and the paired comparison reach the report.

Every unit really runs (main.py's loop, hycam.evaluation.evaluate and .retention in this process to stay fast;
scripts/plot.py, no module, through the study's own subprocess runner).
"""

import json
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace

import pytest
import torch
from conftest import REPO

from hycam.baselines import methods
from hycam.data import multitask_batches
from hycam.evaluation import evaluate, retention
from hycam.study import report
from hycam.study.__main__ import main as study_main
from hycam.study.checkout import check_commit, subprocess_runner
from hycam.study.layout import PREAMBLE
from hycam.study.methods import family
from hycam.study.runs import Run
from hycam.study.settings import Settings
from hycam.study.study import Study
from hycam.train.config import parse_args
from hycam.train.guards import Interrupts
from hycam.train.loop import main as train_main
from hycam.train.loop import setup


class InProcess:
    """Runs the study's commands in this process (scripts/plot.py in a subprocess) and remembers them."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], log) -> int:
        self.calls.append(argv)
        args = argv[1:]
        if args[0] == "scripts/plot.py":
            return subprocess_runner(argv, log, threads=1)
        with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):
            try:
                if args[0] == "main.py":
                    train_main(args[1:])
                    return 0
                if args[1] == "hycam.evaluation.retention":
                    return retention.main(args[2:])
                return evaluate.main(args[2:])
            except SystemExit as stop:
                return 1 if stop.code else 0

    def trained(self) -> list[str]:
        return [argv[argv.index("--output_dir") + 1].rsplit("/", 1)[1] for argv in self.calls if argv[1] == "main.py"]


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    """The 24 shortest records of each real task file: every prompt fits the tiny tokenizer's 512 tokens."""
    source = REPO.parent / "shared" / "data"
    if not source.is_dir():
        pytest.skip(f"{source} is not there")
    folder = tmp_path_factory.mktemp("data")
    for file in sorted(source.glob("*.jsonl")):
        lines = sorted(file.read_text().splitlines(), key=len)[:24]
        (folder / file.name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def settings(tiny_model_dir, short_data):
    return Settings(model=str(tiny_model_dir), data=str(short_data), methods=["hycam", "shared_only", "lora"],
                              seeds=[2333, 7], data_seed=11, lr_grid={"hycam": [3e-2, 1e-2], "lora": [1e-2]},
                              lr_extensions=1, max_length=512, steps=2, eval_interval=1, val_records=2,
                              test_records=2, generate_records=1, max_new_tokens=4, eval_batch_size=4,
                              retention_passages=3, retention_tokens=32)


@pytest.fixture(scope="module")
def done(settings, tmp_path_factory):
    """A whole tiny study, run once: (study, runner)."""
    runner = InProcess()
    study = Study(tmp_path_factory.mktemp("study"), settings, runner)
    study.run_all()
    assert study.failures == []
    return study, runner


def summary_loss(study, run) -> float:
    return json.loads((study.run_dir(run) / "summary.json").read_text())["best"]


def test_the_sweep_extends_its_grid_past_the_better_edge_and_chooses_the_lowest_loss(done):
    study, _ = done
    first = [summary_loss(study, Run("hycam", lr, 2333)) for lr in (1e-2, 3e-2)]
    added = 9e-2 if first[1] < first[0] else 3.33e-3  # one step of the grid's ratio beyond the better edge
    runs = study.sweep_runs()["hycam"]
    assert [run.lr for run in runs] == sorted([1e-2, 3e-2, added])
    losses = [summary_loss(study, run) for run in runs]
    chosen = runs[losses.index(min(losses))].lr
    assert study.chosen_lrs()["hycam"] == chosen
    assert study.at_edge() == {"hycam": chosen in (runs[0].lr, runs[-1].lr), "lora": False}


def test_every_method_and_seed_trains_once_at_its_familys_lr_and_is_evaluated(done):
    study, runner = done
    lrs = study.chosen_lrs()
    expected = {f"{m}_lr{lrs[family(m)]:g}_s{seed}" for m in ("hycam", "shared_only", "lora")
                for seed in (2333, 7)}
    assert {run.name for run in study.main_runs()} == expected
    sweep = {run.name for runs in study.sweep_runs().values() for run in runs}
    assert sorted(runner.trained()) == sorted(sweep | expected)  # the chosen sweep runs are not trained again
    for run in study.main_runs():
        result = json.loads((study.eval_dir(run) / "results.json").read_text())
        assert (result["method"], result["seed"], result["split"]) == (run.method, run.seed, "test")


def test_a_rerun_of_a_finished_study_runs_nothing(done):
    study, _ = done
    again = InProcess()
    Study(study.root, study.settings, again).run_all()
    assert again.calls == []


def test_an_interrupted_run_continues_from_its_resume_state(settings, tmp_path):
    runner = InProcess()
    study = Study(tmp_path, settings, runner)
    run = Run("hycam", 1e-3, 2333)
    train_main(study.train_argv(run)[2:] + ["--halt_after_steps", "1"])
    assert study.status(run) == "resume"
    assert study.train(run)
    assert runner.calls[0][-2:] == ["--resume", "true"]
    rows = [json.loads(line) for line in (study.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert not (study.run_dir(run) / "resume").exists()


def test_a_run_stopped_before_its_first_validation_starts_again(settings, tmp_path):
    runner = InProcess()
    study = Study(tmp_path, settings, runner)
    run = Run("lora", 1e-3, 2333)
    study.run_dir(run).mkdir(parents=True)
    (study.run_dir(run) / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    assert study.train(run)
    assert "--resume" not in runner.calls[0]
    assert study.status(run) == "done"


def test_a_study_dir_refuses_other_settings(settings, tmp_path):
    Study(tmp_path, settings).check_settings()
    with pytest.raises(SystemExit, match="steps"):
        Study(tmp_path, replace(settings, steps=3)).check_settings()


def test_the_report_keeps_the_preamble_and_marks_a_smoke_run(done, tmp_path):
    study, _ = done
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# My study\n\nWritten by hand.\n\n" + report.MARKER + "\n\nSmoke run: old numbers\n")
    smoke = Study(study.root, replace(study.settings, quick=True))
    report.publish(smoke, results)
    text = results.read_text()
    assert text.startswith("# My study\n\nWritten by hand.\n\n" + report.MARKER)
    assert "old numbers" not in text and "NOT the study" in text
    assert "| HyCAM |" in text and "| Shared-CAM-Only |" in text
    assert (results.parent / "figures" / "loss.png").is_file()


def test_a_smoke_run_does_not_replace_the_studys_report(done, tmp_path):
    study, _ = done
    results = tmp_path / "RESULTS.md"
    report.publish(study, results)
    full = results.read_text()
    report.publish(Study(study.root, replace(study.settings, quick=True)), results)
    assert results.read_text() == full


def test_seeds_share_the_split_and_data_order_and_differ_in_the_init(settings, tmp_path):
    study = Study(tmp_path, settings)
    setups = []
    for seed in (2333, 7):
        cfg = parse_args(study.train_argv(Run("hycam", 1e-3, seed))[2:])
        study.run_dir(Run("hycam", 1e-3, seed)).mkdir(parents=True)
        setups.append((cfg, setup(cfg, 0, 1, lambda msg: None, Interrupts(), record=True)))
    (cfg_a, a), (cfg_b, b) = setups
    assert (cfg_a.split_seed, cfg_b.split_seed) == (11, 11)
    assert a.splits == b.splits
    assert multitask_batches(a.splits["train"], 2, cfg_a.split_seed) == multitask_batches(b.splits["train"], 2, 11)
    assert multitask_batches(a.splits["train"], 2, 11) != multitask_batches(a.splits["train"], 2, 2333)
    weights_a, weights_b = (methods.trainable(run.engine.module, "hycam") for run in (a, b))
    assert weights_a.keys() == weights_b.keys()
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert parse_args(["--seed", "5"]).split_seed == 5  # without --data_seed, --seed draws the split as before


def test_every_seeds_evaluation_scores_the_same_test_records(done):
    study, _ = done
    files = [study.eval_dir(run) / "results.json" for run in study.main_runs()]
    results = [json.loads(file.read_text()) for file in files]
    ids = {tuple(r["id"] for r in result["records"]) for result in results}
    assert len(ids) == 1 and len(next(iter(ids))) == 5 * 2  # 5 tasks x test_records
    assert {(result["seed"], result["split_seed"]) for result in results} == {(2333, 11), (7, 11)}
    for result in results:
        for task, values in result["tasks"].items():
            rows = [r for r in result["records"] if r["task"] == task]
            nll = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
            assert values["ppl"] == pytest.approx(math.exp(nll), rel=1e-9)
            assert (values["scored"], values["samples"]) == (2, 1)


def test_retention_is_scored_for_the_base_model_and_every_run(done):
    study, _ = done
    base = json.loads(study.retention_file(None).read_text())
    assert base["method"] == "base" and len(base["records"]) == 3
    for run in study.main_runs():
        result = json.loads(study.retention_file(run).read_text())
        assert [r["id"] for r in result["records"]] == [r["id"] for r in base["records"]]
        assert (result["method"], result["seed"]) == (run.method, run.seed)
    texts = [json.loads(line)["text"] for line in (study.root / "general_text.jsonl").read_text().splitlines()]
    assert len(texts) == 3 and all(len(text) >= 400 for text in texts)


def test_the_report_has_the_paired_comparison_retention_and_validation_curves(done, tmp_path):
    study, _ = done
    text = report.report(study, "# Study\n")
    assert "| HyCAM vs | averaged PPL |" in text and "| LoRA | " in text
    assert "ΔNLL general text↓ [95% CI]" in text
    assert "## Validation loss during training" in text and "step 2" in text
    assert "### Knowledge retention" in text


def test_a_study_refuses_a_dirty_tree_and_another_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "a.txt").write_text("one\n")
    for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-qm", "one"]):
        subprocess.run(git + args, check=True)
    study = tmp_path / "study"
    check_commit(study, allow_dirty=False, quick=False, repo=repo)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert json.loads((study / "provenance.json").read_text()) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("two\n")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        check_commit(study, allow_dirty=False, quick=False, repo=repo)
    subprocess.run(git + ["commit", "-qam", "two"], check=True)
    with pytest.raises(SystemExit, match=f"started at commit {head}"):
        check_commit(study, allow_dirty=False, quick=False, repo=repo)
    check_commit(study, allow_dirty=True, quick=False, repo=repo)  # allowed, and recorded as such
    assert json.loads((study / "provenance.json").read_text()) == {"commit": head, "dirty": True}


def test_a_pending_preamble_is_replaced_by_a_full_studys_report_only(done, tmp_path):
    study, _ = done
    results = tmp_path / "RESULTS.md"
    old = "# Old design\n\n" + report.PENDING + "\n\n" + report.MARKER + "\n\nSmoke run: old numbers\n"
    results.write_text(old)
    report.publish(Study(study.root, replace(study.settings, quick=True)), results)
    assert results.read_text().startswith("# Old design\n\n" + report.PENDING)
    report.publish(study, results)
    text = results.read_text()
    assert text.startswith(PREAMBLE.read_text().rstrip() + "\n\n" + report.MARKER)
    assert report.PENDING not in text and "| HyCAM vs |" in text


@pytest.mark.parametrize("quick", [False, True])
def test_the_command_plans_a_new_study_and_runs_nothing(quick, tmp_path):
    root = tmp_path / "study"
    argv = [sys.executable, "-m", "hycam.study", "--plan", "--study_dir", str(root)] + (["--quick"] if quick else [])
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"sweep {'hycam_lr0.001_s2333':32} todo"
    assert "retention base model todo" in lines
    trained = [line for line in lines if line.startswith("train ")]
    assert len(trained) == (9 if quick else 4 * 2)
    assert lines[-1].startswith("estimated time left on an idle 2-core machine: ")
    assert not root.exists()


def test_the_report_alone_refuses_a_study_dir_of_other_settings(done, tmp_path):
    study, _ = done
    with pytest.raises(SystemExit, match="planned with other settings"):
        study_main(["--report_only", "--study_dir", str(study.root), "--results", str(tmp_path / "RESULTS.md")])
    assert not (tmp_path / "RESULTS.md").exists()
