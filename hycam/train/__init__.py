"""The training harness behind ``main.py``: options, and the parts of a DeepSpeed run.

- ``config``: ``TrainConfig``, read from YAML files and the command line.
- ``run``: distributed start-up, data splits, the DeepSpeed config, the schedule, validation and
  the metrics log.

Imports the method, ``hycam.baselines`` and ``hycam.data``; never ``hycam.evaluation``.
"""
