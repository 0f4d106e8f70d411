"""What the figures measure: loss curves across seeds, A_fusion, expert utilisation, pooled
attention outputs, and the t-SNE's cluster score, each checked against a direct computation; and
what they draw, read back from the figure and from its PNG."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from matplotlib.image import imread

import hycam
from hycam.evaluation import loss_curves, plots
from hycam.inject import decoder_layers


def png_of(fig, path):
    """The figure saved and read back: (height, width, RGBA) pixels, of the figure's size at plots.DPI."""
    pixels = imread(plots.save_figure(fig, path))
    width, height = fig.get_size_inches() * plots.DPI
    assert pixels.shape == (round(height), round(width), 4)
    return pixels


def inked(pixels) -> float:
    """The share of pixels that are not white background."""
    return float((pixels[..., :3] < 0.95).any(-1).mean())


def write_run(folder, method, seed, train, validation):
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"method": method, "seed": seed}))
    rows = [{"step": s, "split": "train", "loss": v, "task_loss": v, "balance_loss": 0.0, "lr": 1e-4,
             "tokens_per_s": 1.0} for s, v in train.items()]
    rows += [{"step": s, "split": "validation", "loss": v, "tasks": {"t": v}} for s, v in validation.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_loss_curves_align_seeds_by_step_and_leave_gaps_where_a_run_stopped(tmp_path):
    runs = [write_run(tmp_path / "a", "hycam", 1, {1: 3.0, 2: 2.0, 3: 1.0}, {3: 1.5}),
            write_run(tmp_path / "b", "hycam", 2, {1: 5.0, 2: 4.0}, {2: 4.5}),
            write_run(tmp_path / "c", "lora", 1, {1: 6.0}, {})]
    curves = loss_curves.loss_curves(runs)
    steps, values = curves["hycam"]["train"]
    assert steps.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(values, [[3.0, 2.0, 1.0], [5.0, 4.0, np.nan]])
    assert curves["hycam"]["validation"][0].tolist() == [2, 3]
    assert set(curves["lora"]) == {"train"}
    train, validation = loss_curves.loss_figure(curves).axes
    assert [t.get_text() for t in train.get_legend().get_texts()] == ["hycam (2 seeds)", "lora (1 seeds)"]
    np.testing.assert_array_equal(train.lines[1].get_ydata(), [4.0, 3.0, 1.0])  # hycam's raw mean, gap skipped
    assert [t.get_text() for t in validation.get_legend().get_texts()] == ["hycam (2 seeds)"]


SPREAD = math.sqrt(14 / 3)  # the population std of 1, 2 and 6


@pytest.mark.parametrize("band, low, high", [("minmax", 1.0, 6.0), ("std", 3 - SPREAD, 3 + SPREAD)])
def test_the_validation_band_spans_the_seeds(tmp_path, band, low, high):
    runs = [write_run(tmp_path / str(seed), "hycam", seed, {1: 5.0, 2: 4.0}, {2: value})
            for seed, value in ((1, 1.0), (2, 2.0), (3, 6.0))]
    fig = loss_curves.loss_figure(loss_curves.loss_curves(runs), band)
    validation = fig.axes[1]
    assert validation.lines[0].get_ydata().tolist() == [3.0]
    band_y = validation.collections[0].get_paths()[0].vertices[:, 1]
    assert (band_y.min(), band_y.max()) == (pytest.approx(low), pytest.approx(high))
    assert inked(png_of(fig, tmp_path / f"{band}.png")) > 0.01
    assert loss_curves.plot_loss_curves(runs, tmp_path / "cli.png", band).read_bytes()[:4] == b"\x89PNG"


def test_the_training_loss_is_smoothed_over_the_last_points_skipping_gaps():
    np.testing.assert_allclose(loss_curves.smooth(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(loss_curves.smooth(np.array([np.nan, 2.0, np.nan, 4.0]), 2), [np.nan, 2.0, 2.0, 4.0])


def gate_stats(gates_by_task: dict[str, list], tokens: dict[str, int]) -> dict[str, dict]:
    return {t: {"tokens": tokens[t], "mean_gate": g, "token_share": g, "entropy": [0.0] * len(g)}
            for t, g in gates_by_task.items()}


def test_routing_divergence_is_0_for_equal_routing_and_1_bit_for_disjoint_experts():
    stats = gate_stats({"a": [[1.0, 0.0], [0.5, 0.5]], "b": [[0.0, 1.0], [0.5, 0.5]]}, {"a": 10, "b": 10})
    result = plots.routing_divergence(stats)
    assert result["between_tasks"] == pytest.approx([1.0, 0.0], abs=1e-12)
    # layer 0: each task against the even mix [0.5, 0.5] of both
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert result["from_all"]["a"] == pytest.approx([expected, 0.0], abs=1e-12)
    weighted = plots.routing_divergence(gate_stats({"a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}, {"a": 30, "b": 10}))
    assert weighted["from_all"]["a"][0] < weighted["from_all"]["b"][0]  # the mix leans to a's 30 tokens


def test_the_expert_figure_is_drawn_for_many_layers(tmp_path):
    rng = np.random.default_rng(0)
    stats = gate_stats({t: rng.dirichlet(np.ones(5), size=30).tolist() for t in ("a", "b", "c")},
                       {"a": 100, "b": 50, "c": 20})
    fig = plots.expert_figure(stats, list(range(30, 60)))
    divergence, *maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [len(line.get_ydata()) for line in divergence.lines] == [30] * 4  # between tasks, then each task
    ticks = [t.get_text() for t in divergence.get_xticklabels()]
    assert ticks[0] == "30" and len(ticks) <= 16  # layer names, thinned so that they do not overlap
    assert [ax.get_title() for ax in maps] == ["a (100 tokens)", "b (50 tokens)", "c (20 tokens)"]
    assert all(ax.images[0].get_array().shape == (5, 30) and len(ax.get_xticks()) <= 6 for ax in maps)
    assert inked(png_of(fig, tmp_path / "experts.png")) > 0.05


def test_a_run_dir_without_metrics_is_named(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"method": "hycam", "seed": 1}))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing"):
        loss_curves.loss_curves([tmp_path])


def modulated(**config):
    return hycam.apply(tiny_model(), hycam.HyCAMConfig(num_specialized=3, rank=8, init_std=0.3, **config))


@torch.no_grad()
def attention_output(model, ids, layer):
    captured = []
    handle = decoder_layers(model)[layer].self_attn.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    model(input_ids=ids)
    handle.remove()
    return captured[0][0]


def test_modulation_weights_are_what_turns_h_att_into_h_out():
    model, ids = modulated(), torch.randint(1, 128, (1, 9))
    weights = plots.modulation_weights(model, ids, layer=0)
    h_out = attention_output(model, ids, 0)
    h_att = attention_output(hycam.remove(model), ids, 0)  # layer 0's input does not depend on HyCAM
    assert weights.shape == (9, 64) and weights.abs().mean() > 0.01
    torch.testing.assert_close(h_out, h_att * (1 + weights), atol=1e-5, rtol=1e-5)


def random_examples(lengths, task="t", seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * n, "task": task})
    return examples


@torch.no_grad()
def test_expert_utilisation_counts_every_real_token_once_and_no_padding():
    model, examples = modulated(), random_examples([4, 9, 2, 7])
    stats = plots.expert_utilisation(model, {"t": examples}, pad_token_id=0, batch_size=4)["t"]
    probs = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), output_hycam_routing=True).hycam_router_probs[:, 0] for e in examples], 1)
    argmax_share = [[float((layer.argmax(-1) == k).double().mean()) for k in range(3)] for layer in probs]
    entropy = [float(-(layer * layer.log()).sum(-1).mean()) for layer in probs]
    assert stats["tokens"] == 22
    np.testing.assert_allclose(stats["token_share"], argmax_share, atol=1e-12)
    np.testing.assert_allclose(stats["mean_gate"], probs.mean(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["entropy"], entropy, atol=1e-6)
    assert all(0 < h < math.log(3) for h in stats["entropy"])


def test_expert_utilisation_needs_routers():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig.variant("shared_only"))
    with pytest.raises(ValueError, match="no routers"):
        plots.expert_utilisation(model, {"t": random_examples([3])}, pad_token_id=0)


def test_pooled_attention_outputs_ignore_padding_and_see_the_modulation():
    model, examples = modulated(), random_examples([3, 8, 5])
    batched = plots.pooled_attention_outputs(model, examples, layer=1, pad_token_id=0, batch_size=3)
    alone = np.concatenate([plots.pooled_attention_outputs(model, [e], 1, 0) for e in examples])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    without = plots.pooled_attention_outputs(hycam.remove(model), examples, 1, 0)
    assert np.abs(batched - without).max() > 1e-3


def test_tsne_scores_separated_tasks_high_and_mixed_ones_low(tmp_path):
    rng = np.random.default_rng(0)
    tasks = ["a"] * 15 + ["b"] * 15
    centres = np.repeat(np.eye(8)[:2] * 10, 15, axis=0)  # two far-apart directions
    separated = centres + rng.normal(size=(30, 8))
    mixed = rng.normal(size=(30, 8))
    fig, scores = plots.tsne_figure({"separated": separated, "mixed": mixed}, tasks)
    assert scores["separated"] > 0.8 and abs(scores["mixed"]) < 0.2
    assert [ax.get_title() for ax in fig.axes] == [f"separated (silhouette {scores['separated']:.3f})",
                                                   f"mixed (silhouette {scores['mixed']:.3f})"]
    assert all([len(c.get_offsets()) for c in ax.collections] == [15, 15] for ax in fig.axes)  # a colour a task
    assert inked(png_of(fig, tmp_path / "tsne.png")) > 0.01
    assert plots.plot_tsne({"mixed": mixed}, tasks, tmp_path / "cli.png")["mixed"] == scores["mixed"]
