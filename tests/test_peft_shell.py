"""peft reads HyCAM adapters in processes that never `import hycam`: the lm-eval command line, AutoPeftModel.

The processes run in a virtual environment of their own that sees this machine's packages and has this
checkout installed as a user installs it (`pip install -e .`), so that its `hycam-peft.pth` is what Python
runs at start-up, as it is for a user.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, standalone_env
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hycam

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory):
    """The python of a venv (with this machine's site-packages) into which this checkout is installed editable."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                   check=True, cwd=venv, capture_output=True)
    return python


def env() -> dict[str, str]:
    """A fresh process's environment, without this test's path tweaks (conftest puts the checkout on PYTHONPATH)."""
    return {k: v for k, v in standalone_env().items() if k != "PYTHONPATH"} | OFFLINE


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           hycam.HyCAMConfig(rank=8, init_std=0.3))
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


AUTO_PEFT = """
import torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({adapter!r}).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(1, 9)[None]).logits, "logits.pt")
"""

TASK = """\
task: hycam_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def shell(installed_python, tiny_model_dir, adapter_dir, tmp_path_factory):
    """The folder and the two fresh processes, started together since each spends its time importing: a script
    calling AutoPeftModelForCausalLM, and the lm_eval command on a local task of three records."""
    work = tmp_path_factory.mktemp("shell")
    rows = [{"question": "Let's think step by step.", "choices": [" The answer is", " step by step"], "answer": i % 2}
            for i in range(3)]
    (work / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (work / "task.yaml").write_text(TASK.format(data=work / "data.jsonl"))
    lm_eval = ["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},peft={adapter_dir},"
               "dtype=float32", "--tasks", "hycam_tiny", "--include_path", str(work), "--device", "cpu",
               "--batch_size", "1", "--output_path", str(work / "out"), "--log_samples"]
    started = {name: subprocess.Popen([installed_python, *args], cwd=work, env=env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in (("auto_peft", ["-c", AUTO_PEFT.format(adapter=str(adapter_dir))]),
                                  ("lm_eval", lm_eval))}
    yield work, started
    for process in started.values():
        process.kill()


def test_starting_python_imports_neither_torch_nor_hycam(installed_python, tmp_path):
    done = subprocess.run([installed_python, "-c", "import sys; print(sorted({'torch', 'hycam', 'peft'} & "
                           "set(sys.modules)), [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "
                           "'PeftWatcher'])"], cwd=tmp_path, env=env(), capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "['PeftWatcher']"]


def test_the_pth_line_is_silent_where_the_hook_cannot_be_found(tmp_path):
    """An editable install whose checkout was moved or deleted must not print an error in every process."""
    line = (REPO / "hycam-peft.pth").read_text().strip()
    done = subprocess.run([sys.executable, "-S", "-c", f"{line}\nimport sys; print('hycam_peft_hook' in sys.modules)"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "False", "")


def test_auto_peft_model_reads_a_hycam_adapter_in_a_fresh_process(shell, adapter_dir):
    work, started = shell
    finish(started["auto_peft"])
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter_dir / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=torch.arange(1, 9)[None]).logits
    assert torch.equal(torch.load(work / "logits.pt"), expected)


def test_the_lm_eval_command_scores_with_a_hycam_adapter(shell, tiny_model_dir, adapter_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    work, started = shell
    finish(started["lm_eval"])
    (samples,) = (work / "out").rglob("samples_hycam_tiny_*.jsonl")
    sample = json.loads(samples.read_text().splitlines()[0])
    request = sample["arguments"]["gen_args_0"]
    lm = HFLM(pretrained=str(tiny_model_dir), peft=str(adapter_dir), device="cpu", batch_size=1, dtype="float32")
    (expected, _), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, idx=0,
                                                arguments=(request["arg_0"], request["arg_1"]))])
    assert float(sample["filtered_resps"][0][0]) == pytest.approx(expected, abs=1e-4)
