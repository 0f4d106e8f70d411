"""The paired study of HyCAM and the paper's baselines (`python -m hycam.study`; see its --help).

Imports run one way, each module only from those above it:

    methods, runs, layout  ->  settings  ->  checkout, base_model, commands, sweep  ->  study
    ->  plan, paired, flattening  ->  claims  ->  report  ->  __main__

The study uses hycam's harnesses (hycam.train through main.py, hycam.evaluation, hycam.data); nothing in
hycam imports it. This file imports nothing, so that importing any module of the package runs no other.
"""
