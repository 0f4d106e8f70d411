"""The paper's baselines, and every method of its tables by name.

- ``adapters``: what the adapter baselines share (a wrapped ``nn.Linear``, injection, removal).
- ``multilora``: Multi-LoRA. ``riemoe``: RieMoE-LoRA with Riemannian preconditioning.
- ``methods``: build, train-mark, save and reload any method (HyCAM and its ablations, peft LoRA,
  Multi-LoRA, RieMoE-LoRA, full fine-tuning) by its name.

Imports the method (``hycam``) and nothing of the harnesses (``hycam.train``, ``hycam.evaluation``).
"""
