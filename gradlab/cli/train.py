"""``gradlab train``: one run or a grid (batch sizes × learning rates × seeds × optimizers)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradlab.cli.common import add_dispatch_arguments, add_task_arguments, dispatch_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with TrainConfig keys (flags given explicitly override it)")
    p.add_argument("--model", help="model name (mlp, cnn, vgg, resnet) or pkg.module:factory [mlp]")
    p.add_argument("--model-kwargs", help='JSON keyword arguments for the model, e.g. \'{"widths": [256, 256]}\'')
    p.add_argument("--data", help="dataset (digits, mnist, fashion-mnist, cifar10) or pkg.module:factory [digits]")
    p.add_argument("--data-root", help="folder with the raw files of MNIST/Fashion-MNIST/CIFAR-10")
    p.add_argument("--download", action="store_true", default=None,
                   help="download MNIST/Fashion-MNIST/CIFAR-10 (checksum-verified) if missing from --data-root")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes [32,256]")
    p.add_argument("--lr", "--lrs", dest="lrs", help="comma-separated base learning rates [0.01]")
    p.add_argument("--seeds", help="comma-separated seeds [0]")
    p.add_argument("--optimizer", "--optimizers", dest="optimizers", help="sgd and/or adam, comma-separated [sgd]")
    p.add_argument("--momentum", type=float, help="SGD momentum [0]")
    p.add_argument("--weight-decay", type=float, help="weight decay [0]")
    p.add_argument("--epochs", type=int, help="epochs per run [30]")
    p.add_argument("--checkpoint-epochs", help="epochs to checkpoint besides init (epoch 0) [2,30]")
    p.add_argument("--lr-scaling", choices=["constant", "linear", "sqrt", "sum"],
                   help="how lr scales with batch size: constant, linear (Goyal), sqrt, sum (Masters & Luschi)")
    p.add_argument("--base-batch-size", type=int, help="m_base of the scaling rules [32]")
    p.add_argument("--warmup-epochs", type=float, help="gradual warmup length in epochs [0]")
    p.add_argument("--decay-epochs", help="step decay epochs, e.g. 30,60,90")
    p.add_argument("--decay-factor", type=float, help="step decay factor [0.1]")
    p.add_argument("--cyclic", action="store_true", default=None, help="cyclic lr (triangular2) between η/f and η·f")
    p.add_argument("--cyclic-factor", type=float, help="cyclic factor f [10]")
    p.add_argument("--cyclic-sqrt-factor", action="store_true", default=None,
                   help="scale f by sqrt(m_base/m) (the VGG13 report's Equation 2)")
    p.add_argument("--cyclic-half-epochs", type=float, help="half period of the cycle in epochs [2]")
    p.add_argument("--ghost-batch-size", type=int, help="virtual batch size of (ghost) batch norm")
    p.add_argument("--checkpoint-format", choices=["pt", "safetensors"], help="checkpoint file format [pt]")
    add_task_arguments(p, default_loss=None)
    p.add_argument("--monitor-every", type=int, metavar="K",
                   help="record the gradient noise monitor every K steps into runs/<run>/monitor.zarr [1: every "
                        "step; 0: off]")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="run the model and the data's floating tensors in this dtype [as they come]")
    p.add_argument("--out", required=True, help="output folder (train.zarr + runs/<name>/epochNNN.pt)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted grid in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dispatch_arguments(p)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from gradlab.errors import UsageError
    from gradlab.train import parse_list

    o: dict[str, Any] = {}
    if args.model is not None:
        o["model"] = args.model
    if args.model_kwargs is not None:
        try:
            o["model_kwargs"] = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON ({exc}); e.g. '{{\"widths\": [256, 256]}}'") from None
        if not isinstance(o["model_kwargs"], dict):
            raise UsageError("--model-kwargs must be a JSON object")
    for flag, key, cast in (("--batch-sizes", "batch_sizes", int), ("--lr", "lrs", float), ("--seeds", "seeds", int),
                            ("--optimizer", "optimizers", str), ("--checkpoint-epochs", "checkpoint_epochs", int),
                            ("--decay-epochs", "decay_epochs", int)):
        value = getattr(args, key)
        if value is not None:
            o[key] = parse_list(value, cast, flag)
    for key in ("data", "data_root", "download", "momentum", "weight_decay", "epochs", "lr_scaling", "base_batch_size",
                "warmup_epochs", "decay_factor", "cyclic", "cyclic_factor", "cyclic_sqrt_factor",
                "cyclic_half_epochs", "ghost_batch_size", "checkpoint_format", "loss", "collate", "dtype", "monitor_every"):
        value = getattr(args, key)
        if value is not None:
            o[key] = value
    return o


def run(args: argparse.Namespace) -> int:
    from gradlab.train import TrainConfig, config_from_toml, train_grid

    overrides = _overrides(args)
    cfg = config_from_toml(args.config, overrides) if args.config else TrainConfig(**overrides)
    workers, scheduler = dispatch_args(args)
    store = train_grid(cfg, args.out, resume=args.resume, show_progress=not args.no_progress, workers=workers,
                       scheduler=scheduler)
    print(f"wrote {store} and checkpoints under {store.parent / 'runs'}")
    return 0
