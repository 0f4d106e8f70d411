"""The training harness behind ``main.py``: options, and the parts of a DeepSpeed run.

- ``config``: ``TrainConfig``, read from YAML files and the command line.
- ``run``: distributed start-up, data splits, the DeepSpeed config, the schedule, validation and
  the metrics log.
- ``rundir``: the run directory's lock, its checkpoint swaps and their recovery, and what a
  start may do with a directory (continue, start over, refuse).
- ``resume``: the resume state (trained weights, optimizer, schedule) as safetensors and JSON.
- ``guards``: SIGINT/SIGTERM handling and the stale build-lock check.

Imports the method, ``hycam.baselines`` and ``hycam.data``; never ``hycam.evaluation``.
"""
