from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "hycam-peft.pth"
"""Run by Python at start-up from site-packages: makes peft know HyCAM in processes that never import hycam
(`hycam_peft_hook`), without importing torch."""


class BuildPy(build_py):
    """build_py that also puts `hycam-peft.pth` at the top of site-packages: through build_lib for a normal
    install, through the editable wheel's own folder (the `install` command's install_lib) for `pip install -e`."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        target = Path(self.distribution.get_command_obj("install").install_lib if editable else self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        self.copy_file(PTH, str(target / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(
    name="hycam",
    version="0.1.0",
    description="HyCAM: Hybrid Contextual Attention Modulation for multi-task adaptation of LLMs (CIKM 2025)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hycam", "hycam.*"]),
    py_modules=["hycam_peft_hook"],
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.3",  # torch.compiler.is_compiling
        "transformers>=4.45,<6",
        "safetensors>=0.4",
        "numpy>=1.24",
        "peft>=0.21",  # HyCAM is a peft method; 0.21 gave tuners the state-dict hooks it needs
    ],
    extras_require={
        "train": ["deepspeed>=0.13", "pyyaml>=6", "tqdm>=4.60", "tensorboard>=2.14",
                  "accelerate>=0.34", "gguf>=0.10", "sentencepiece>=0.2", "datasets>=2.14"],
        "eval": ["sacrebleu>=2.3", "rouge-score>=0.1.2", "nltk>=3.8", "scipy>=1.10", "matplotlib>=3.7",
                 "scikit-learn>=1.3", "tqdm>=4.60", "datasets>=2.14"],
        # the study's retention measure: gensim ships a Wikipedia sample as test data
        "study": ["hycam[train,eval]", "gensim>=4.3"],
        # --quantization 4bit/8bit: QLoRA-style bases; 0.48 moves 8-bit models across devices, and has a CPU backend
        "quant": ["bitsandbytes>=0.48"],
        "dev": ["hycam[study,quant]", "pytest>=7", "trl>=1.16", "lm-eval>=0.4.13"],
    },
    entry_points={"console_scripts": ["hycam-eval=hycam.evaluation.evaluate:main"]},
)
