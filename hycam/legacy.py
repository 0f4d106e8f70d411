"""Files written by hycam 0.1.0, whose HyCAM tensors had other names, read under today's names.

hycam 0.1.0 kept one layer's HyCAM at `<layer>.self_attn.hycam.` with parts named after its code
(`shared`, `spec_down.down`, `spec_down.mix`, `spec_up`, `router`); today's hang at
`<layer>.self_attn.hycam_modules.<adapter>.` with the paper's names, and a trained router's weight is
the last rows of `W_in`. `upgrade` maps the old to the new
in their checkpoint form (without an adapter name, as peft writes them); the loaders then put in the
model's adapter name as they do for any file.
"""

from __future__ import annotations

import torch

OLD_MODULE = ".self_attn.hycam."
NEW_MODULE = ".self_attn.hycam_modules."
RENAMED = {"shared.bias": "b_shared", "spec_down.mix": "N", "spec_up": "B", "spec_bias": "b_spec",
           "router.bias": "b_router"}
"""Old part -> new name, for the parts that are only renamed."""


def is_old(name: str) -> bool:
    """Whether `name` is a HyCAM tensor name of hycam 0.1.0."""
    return OLD_MODULE in name


def upgrade(tensors: dict[str, torch.Tensor], train_router: bool = True) -> dict[str, torch.Tensor]:
    """`tensors` with every hycam 0.1.0 HyCAM tensor under its new name; other tensors unchanged.
    `train_router`: the config's, which decides whether the router's weight is part of `W_in`."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in tensors.items():
        if is_old(name):
            head, _, part = name.partition(OLD_MODULE)
            layers.setdefault(head, {})[part] = tensor
        else:
            out[name] = tensor
    for head, parts in layers.items():
        out.update({f"{head}{NEW_MODULE}{key}": value for key, value in _layer(parts, train_router).items()})
    return out


def _layer(old: dict[str, torch.Tensor], train_router: bool) -> dict[str, torch.Tensor]:
    """One layer's old parts -> its new parameters; `W_in` stacks the rows in its order: W_shared (or
    A_shared), then A_1..A_N, then W_router (a frozen router keeps a parameter of its own)."""
    new = {RENAMED[part]: tensor for part, tensor in old.items() if part in RENAMED}
    if "shared_down.down.weight" in old:  # InversePEFT: `shared` was B_shared, `shared_down` A_shared and N_shared
        new["B_shared"], new["N_shared"] = old["shared.weight"], old["shared_down.mix"].squeeze(0)
        rows = [old["shared_down.down.weight"]]
    else:
        rows = [old["shared.weight"]] if "shared.weight" in old else []
    rows += [old["spec_down.down.weight"]] if "spec_down.down.weight" in old else []
    if "router.weight" in old and train_router:
        rows.append(old["router.weight"])
    elif "router.weight" in old:
        new["W_router"] = old["router.weight"]
    if rows:
        new["W_in"] = torch.cat(rows)
    return new
