"""peft reads HyCAM adapters in processes that never `import hycam`: the lm-eval command line, AutoPeftModel.

The processes run in a virtual environment of their own that sees this machine's packages and has this
checkout installed as a user installs it (`pip install -e .`), so that its `hycam-peft.pth` is what Python
runs at start-up, as it is for a user.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
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


def run(python, *args, cwd):
    """A fresh process without this test's path tweaks (conftest puts the checkout on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE
    done = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           hycam.HyCAMConfig(rank=8, init_std=0.3))
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def test_starting_python_imports_neither_torch_nor_hycam(installed_python, tmp_path):
    out = run(installed_python, "-c", "import sys; print(sorted({'torch', 'hycam', 'peft'} & set(sys.modules)), "
              "[type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'PeftWatcher'])", cwd=tmp_path)
    assert out.split() == ["[]", "['PeftWatcher']"]


def test_auto_peft_model_reads_a_hycam_adapter_in_a_fresh_process(installed_python, adapter_dir, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.arange(1, 9)[None]).logits, "logits.pt")
        """)
    run(installed_python, "-c", script, cwd=tmp_path)
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter_dir / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=torch.arange(1, 9)[None]).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


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


def test_the_lm_eval_command_scores_with_a_hycam_adapter(installed_python, tiny_model_dir, adapter_dir, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    rows = [{"question": "Let's think step by step.", "choices": [" The answer is", " step by step"], "answer": i % 2}
            for i in range(3)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    run(installed_python, "-m", "lm_eval", "--model", "hf", "--model_args",
        f"pretrained={tiny_model_dir},peft={adapter_dir},dtype=float32", "--tasks", "hycam_tiny",
        "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "1", "--output_path",
        str(tmp_path / "out"), "--log_samples", cwd=tmp_path)
    (samples,) = (tmp_path / "out").rglob("samples_hycam_tiny_*.jsonl")
    sample = json.loads(samples.read_text().splitlines()[0])
    request = sample["arguments"]["gen_args_0"]
    lm = HFLM(pretrained=str(tiny_model_dir), peft=str(adapter_dir), device="cpu", batch_size=1, dtype="float32")
    (expected, _), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, idx=0,
                                                arguments=(request["arg_0"], request["arg_1"]))])
    assert float(sample["filtered_resps"][0][0]) == pytest.approx(expected, abs=1e-4)
