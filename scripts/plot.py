"""Draw one figure a command, as PNG (numbers also as JSON where a figure has them).

    python scripts/plot.py loss RUN_DIR... --out loss.png [--band minmax|std]
    python scripts/plot.py modulation --checkpoint CKPT --prompt "Explain ..." --layer 0 --out mod.png
    python scripts/plot.py experts --checkpoint CKPT --tasks ../shared/data --out experts.png
    python scripts/plot.py tsne --checkpoint CKPT --tasks ../shared/data --layer 15 --out tsne.png

Records for `experts` and `tsne` are chosen as `hycam-eval` chooses them (the run's test split, or
every record of the files given with `--tasks`), tokenised as training saw them (prompt and
response). Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hycam
from hycam.data import Record, prompt_ids, tokenize_records
from hycam.evaluation import loss_curves, plots
from hycam.evaluation.loading import load_model_for, read_checkpoint
from hycam.evaluation.selection import (SPLITS, EvalOptions, UsageError, read_tasks, resolve_options, select_records,
                                        task_files)


def loss(args: argparse.Namespace) -> dict:
    return {"png": str(loss_curves.plot_loss_curves(args.run_dirs, args.out, args.band))}


def modulation(args: argparse.Namespace) -> dict:
    checkpoint = read_checkpoint(args.checkpoint)
    template = resolve_options(EvalOptions(split="all"), checkpoint.recorded, args.checkpoint).template
    model, tokenizer = load_model_for(checkpoint, args.base_model, args.device)
    ids = (tokenizer(args.prompt)["input_ids"] if args.raw
           else prompt_ids(Record("prompt", args.prompt, "", "-"), tokenizer, template))
    weights = plots.modulation_weights(model, torch.tensor([ids]), args.layer)
    tokens = [tokenizer.decode([i]) for i in ids]
    png = plots.plot_modulation(weights, tokens, args.out, args.layer, args.max_dims)
    return {"png": str(png), "tokens": len(ids), "mean_abs": float(weights.abs().mean())}


def _examples_by_task(args: argparse.Namespace):
    """The model, the pad id and the tokenised records of each task, chosen like hycam-eval."""
    checkpoint = read_checkpoint(args.checkpoint)
    recorded = checkpoint.recorded
    chosen = EvalOptions(split=args.split, seed=args.seed, limit=args.limit)
    options = resolve_options(chosen, recorded, args.checkpoint, tasks_given=bool(args.tasks))
    records = read_tasks(task_files(args.tasks, recorded), recorded)
    model, tokenizer = load_model_for(checkpoint, args.base_model, args.device)
    by_task = {}
    for task, task_records in select_records(records, options).items():
        by_task[task] = tokenize_records(task_records, tokenizer, options.max_length, options.template)[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, pad, by_task


def experts(args: argparse.Namespace) -> dict:
    model, pad, by_task = _examples_by_task(args)
    stats = plots.expert_utilisation(model, by_task, pad, args.batch_size)
    layers = model.hycam_config.layers if hycam.is_applied(model) else None
    plots.plot_expert_utilisation(stats, args.out, layers)
    Path(args.out).with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    return {"png": args.out, "json": str(Path(args.out).with_suffix(".json"))}


def tsne(args: argparse.Namespace) -> dict:
    model, pad, by_task = _examples_by_task(args)
    if not hycam.is_applied(model):
        raise UsageError(f"{args.checkpoint} is not a HyCAM checkpoint: there is no CAM to compare without")
    examples = [e for task_examples in by_task.values() for e in task_examples]
    with_cam = plots.pooled_attention_outputs(model, examples, args.layer, pad, args.batch_size)
    without = plots.pooled_attention_outputs(hycam.remove(model), examples, args.layer, pad, args.batch_size)
    panels = {"with CAM": with_cam, "without CAM": without}
    scores = plots.plot_tsne(panels, [e["task"] for e in examples], args.out, args.tsne_seed)
    result = {"layer": args.layer, "samples": len(examples), "silhouette": scores}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return {"png": args.out, **result}


def _model_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--checkpoint", required=True, help="checkpoint dir written by main.py")
    sub.add_argument("--base-model", default=None, help="default: the run's")
    sub.add_argument("--device", default="cpu")


def _record_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--tasks", nargs="+", default=None, help="task files or folders (default: the run's)")
    sub.add_argument("--split", choices=SPLITS, default=None,
                     help="default: all of --tasks, else the run's test split (as hycam-eval)")
    sub.add_argument("--seed", type=int, default=None, help="split seed (default: the run's)")
    sub.add_argument("--limit", type=int, default=None, help="records per task")
    sub.add_argument("--batch-size", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("loss", help="training/validation loss of runs, spread across seeds")
    sub.add_argument("run_dirs", nargs="+", help="run dirs with run_config.json and metrics.jsonl")
    sub.add_argument("--band", choices=loss_curves.BANDS, default="minmax", help="min-max or ±std across seeds")
    sub.set_defaults(run=loss)
    sub = commands.add_parser("modulation", help="A_fusion of one layer for one prompt")
    _model_args(sub)
    sub.add_argument("--prompt", required=True, help="an instruction, put in the run's template")
    sub.add_argument("--raw", action="store_true", help="tokenise --prompt as it is, no template")
    sub.add_argument("--layer", type=int, default=0, help="decoder layer index")
    sub.add_argument("--max-dims", type=int, default=None, help="show only the most modulated dims")
    sub.set_defaults(run=modulation)
    sub = commands.add_parser("experts", help="expert utilisation per task and layer (+ JSON)")
    _model_args(sub)
    _record_args(sub)
    sub.set_defaults(run=experts)
    sub = commands.add_parser("tsne", help="t-SNE of a layer's attention output with and without CAM (+ JSON)")
    _model_args(sub)
    _record_args(sub)
    sub.add_argument("--layer", type=int, default=0, help="decoder layer index")
    sub.add_argument("--tsne-seed", type=int, default=0)
    sub.set_defaults(run=tsne)
    for sub in commands.choices.values():
        sub.add_argument("--out", required=True, help="PNG file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = args.run(args)
    except (UsageError, FileNotFoundError, ValueError) as err:
        print(f"plot.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
