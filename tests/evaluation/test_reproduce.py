"""scripts/reproduce.py and its report on a tiny Llama: the sweep picks and reuses runs, reruns skip.

Every unit really runs (main.py, hycam.evaluation.evaluate, scripts/plot.py), in this process to stay fast.
"""

import importlib.util
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace

import pytest
from conftest import REPO

import main as train
from hycam.evaluation import evaluate


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is no package); registered first, as dataclasses need."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = load_script("reproduce")
report = sys.modules["reproduce_report"]  # imported by reproduce.py
plot = load_script("plot")


class InProcess:
    """Runs the study's commands in this process and remembers them."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], log) -> int:
        self.calls.append(argv)
        args = argv[1:]
        with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):
            try:
                if args[0] == "main.py":
                    train.main(args[1:])
                    return 0
                if args[0] == "scripts/plot.py":
                    return plot.main(args[1:])
                return evaluate.main(args[2:])
            except SystemExit as stop:
                return 1 if stop.code else 0

    def trained(self) -> list[str]:
        return [argv[argv.index("--output_dir") + 1].rsplit("/", 1)[1] for argv in self.calls if argv[1] == "main.py"]


@pytest.fixture(scope="module")
def short_data(tmp_path_factory):
    """The 12 shortest records of each real task file: every prompt fits the tiny tokenizer's 512 tokens."""
    source = REPO.parent / "shared" / "data"
    if not source.is_dir():
        pytest.skip(f"{source} is not there")
    folder = tmp_path_factory.mktemp("data")
    for file in sorted(source.glob("*.jsonl")):
        lines = sorted(file.read_text().splitlines(), key=len)[:12]
        (folder / file.name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def settings(tiny_model_dir, short_data):
    return reproduce.Settings(model=str(tiny_model_dir), data=str(short_data), methods=["hycam", "shared_only", "lora"],
                              seeds=[2333, 7], lr_grid={"hycam": [3e-2, 1e-5], "lora": [1e-2]}, max_length=512,
                              steps=2, eval_interval=1, val_records=2, test_records=1, max_new_tokens=4,
                              eval_batch_size=4)


@pytest.fixture(scope="module")
def done(settings, tmp_path_factory):
    """A whole tiny study, run once: (study, runner)."""
    runner = InProcess()
    study = reproduce.Study(tmp_path_factory.mktemp("study"), settings, runner)
    study.run_all()
    assert study.failures == []
    return study, runner


def summary_loss(study, run) -> float:
    return json.loads((study.run_dir(run) / "summary.json").read_text())["best"]


def test_the_sweep_chooses_the_lr_of_the_lowest_validation_loss(done):
    study, _ = done
    runs = study.sweep_runs()["hycam"]
    losses = [summary_loss(study, run) for run in runs]
    assert losses[0] != losses[1]
    assert study.chosen_lrs()["hycam"] == runs[losses.index(min(losses))].lr


def test_every_method_and_seed_trains_once_at_its_familys_lr_and_is_evaluated(done):
    study, runner = done
    lrs = study.chosen_lrs()
    expected = {f"{m}_lr{lrs[reproduce.family(m)]:g}_s{seed}" for m in ("hycam", "shared_only", "lora")
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
    reproduce.Study(study.root, study.settings, again).run_all()
    assert again.calls == []


def test_an_interrupted_run_continues_from_its_resume_state(settings, tmp_path):
    runner = InProcess()
    study = reproduce.Study(tmp_path, settings, runner)
    run = reproduce.Run("hycam", 1e-3, 2333)
    train.main(study.train_argv(run)[2:] + ["--halt_after_steps", "1"])
    assert study.status(run) == "resume"
    assert study.train(run)
    assert runner.calls[0][-2:] == ["--resume", "true"]
    rows = [json.loads(line) for line in (study.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert not (study.run_dir(run) / "resume").exists()


def test_a_run_stopped_before_its_first_validation_starts_again(settings, tmp_path):
    runner = InProcess()
    study = reproduce.Study(tmp_path, settings, runner)
    run = reproduce.Run("lora", 1e-3, 2333)
    study.run_dir(run).mkdir(parents=True)
    (study.run_dir(run) / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    assert study.train(run)
    assert "--resume" not in runner.calls[0]
    assert study.status(run) == "done"


def test_a_study_dir_refuses_other_settings(settings, tmp_path):
    reproduce.Study(tmp_path, settings).check_settings()
    with pytest.raises(SystemExit, match="steps"):
        reproduce.Study(tmp_path, replace(settings, steps=3)).check_settings()


def test_the_report_keeps_the_preamble_and_marks_a_smoke_run(done, tmp_path):
    study, _ = done
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# My study\n\nWritten by hand.\n\n" + report.MARKER + "\n\nSmoke run: old numbers\n")
    smoke = reproduce.Study(study.root, replace(study.settings, quick=True))
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
    report.publish(reproduce.Study(study.root, replace(study.settings, quick=True)), results)
    assert results.read_text() == full
