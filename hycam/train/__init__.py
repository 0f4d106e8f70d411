"""The training harness: the loop behind ``main.py``, its options, and the parts of a DeepSpeed run.

- ``loop``: ``main`` -> ``setup`` -> ``fit`` (micro-steps, ``validate``, stopping), and ``cli``.
- ``state``: ``Run`` (what the loop reads) and ``Progress`` (where it is).
- ``config``: ``TrainConfig``, read from YAML files and the command line.
- ``distributed``: the process group, a plain ``python main.py`` made a group of one.
- ``splits``: the task records and their tokenised train and validation splits.
- ``optimization``: AdamW's groups, the cosine schedule, the DeepSpeed config.
- ``validation``: the validation loss over all ranks.
- ``metrics``: metrics.jsonl and TensorBoard, truncated on resume.
- ``checkpoints``: best/, last/ and resume/ of a run, each written into a staging folder and swapped in.
- ``rundir``: the run directory's lock, its checkpoint swaps and their recovery, and what a
  start may do with a directory (continue, start over, refuse).
- ``resume``: the resume state (trained weights, optimizer, schedule) as safetensors and JSON.
- ``guards``: SIGINT/SIGTERM handling and the stale build-lock check.

Imports the method, ``hycam.baselines`` and ``hycam.data``; never ``hycam.evaluation``. Within it,
``loop`` imports the rest and nothing imports ``loop``.
"""
