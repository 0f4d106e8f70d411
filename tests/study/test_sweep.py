"""The LR sweep's rule on made-up losses: a grid grows past the better edge, one point a finished round."""

import math

from hycam.study.sweep import chosen_lr, extended_grid


def test_a_grid_grows_past_the_edge_with_the_lowest_loss_until_its_extensions_run_out():
    falling = {1e-3: 3.0, 3e-3: 2.0, 9e-3: 1.5, 2.7e-2: 1.2}
    assert extended_grid([3e-3, 1e-3], falling.get, 2) == [1e-3, 3e-3, 9e-3, 2.7e-2]
    rising = {1e-3: 2.0, 3e-3: 3.0, 3.33e-4: 1.0}
    assert extended_grid([1e-3, 3e-3], rising.get, 1) == [3.33e-4, 1e-3, 3e-3]


def test_a_grid_stays_while_its_best_is_inside_a_round_is_unfinished_or_every_run_diverged():
    assert extended_grid([1e-3, 3e-3, 1e-2], {1e-3: 2.0, 3e-3: 1.0, 1e-2: 3.0}.get, 2) == [1e-3, 3e-3, 1e-2]
    assert extended_grid([1e-3, 3e-3], {1e-3: 2.0}.get, 2) == [1e-3, 3e-3]
    assert extended_grid([1e-3, 3e-3], lambda lr: math.inf, 2) == [1e-3, 3e-3]
    assert extended_grid([1e-3], lambda lr: 1.0, 2) == [1e-3]


def test_the_chosen_lr_waits_for_every_point_and_skips_diverged_ones():
    assert chosen_lr({1e-3: 2.0, 3e-3: 1.0}) == 3e-3
    assert chosen_lr({1e-3: 2.0, 3e-3: math.inf}) == 1e-3
    assert chosen_lr({1e-3: 2.0, 3e-3: None}) is None
    assert chosen_lr({1e-3: math.inf, 3e-3: math.inf}) is None
