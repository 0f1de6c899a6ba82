"""``gradlab train`` as a job of the one runner (:mod:`gradlab.runner`): one unit per run of the grid (all its
epochs and checkpoints, :func:`gradlab.train_loop.train_run`), into ``<out>/train.zarr`` with dims
(run, epoch, layer, group) and the checkpoints in ``<out>/runs/<run>/``.  A run whose loss turns non-finite is
recorded as diverged and the grid goes on."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gradlab.runner import Job, Template, Unit, UnitContext
from gradlab.schema import GROUPS
from gradlab.schema.train import train_variables
from gradlab.task import loss_name, task_record
from gradlab.train import TrainConfig, checkpoint_epochs, expand_grid


@dataclass(frozen=True)
class TrainJob(Job):
    """The train store of one grid: ``out`` is the folder holding ``train.zarr`` and ``runs/``."""

    cfg: TrainConfig
    out: str
    kind: ClassVar[str] = "train"
    progress_desc: ClassVar[str] = "train"
    progress_unit: ClassVar[str] = "epoch"

    def config_dict(self) -> dict[str, Any]:
        return {"kind": "train", **self.cfg.to_dict()}

    def threads(self) -> bool:
        return False  # a run's numbers are those of the thread count it trains with, as before the runner

    def prepare(self) -> Any:
        from gradlab.train import load_train_data

        return load_train_data(self.cfg)

    def fingerprints(self) -> dict[str, str]:
        """The data's tensors (train and test splits, in the run dtype) and the model of seed 0."""
        from gradlab.task import data_sha256, model_sha256
        from gradlab.train import init_model

        data = self.state()
        splits = [data.train.batch] + ([data.test.batch] if data.test is not None else [])
        return {"data_content": data_sha256(*splits), "model_architecture": model_sha256(init_model(self.cfg, data, 0))}

    def template(self) -> Template:
        from gradlab.train import validate
        from gradlab.train_loop import layer_kinds

        from gradlab.train import dropped_last_batches

        cfg, data = self.cfg, self.state()
        model = validate(cfg, data)
        names, kinds = layer_kinds(model)
        dropped = dropped_last_batches(cfg, data, model)
        specs = expand_grid(cfg)
        loss = loss_name(cfg.loss or data.loss)
        return Template(
            sizes={"run": len(specs), "epoch": cfg.epochs + 1, "layer": len(names), "group": len(GROUPS)},
            coords={
                "run": ("run", [s.name for s in specs], {"long_name": "run"}),
                "epoch": ("epoch", np.arange(cfg.epochs + 1), {"long_name": "epoch", "units": "epoch"}),
                "layer": ("layer", names, {"long_name": "parameter tensor"}),
                "param_kind": ("layer", kinds, {"long_name": "parameter kind"}),
                "group": ("group", list(GROUPS), {"long_name": "parameter group"}),
                "batch_size": ("run", [s.batch_size for s in specs], {"long_name": "batch size", "units": "examples"}),
                "lr": ("run", [s.lr for s in specs], {"long_name": "base learning rate", "units": "1"}),
                "seed": ("run", [s.seed for s in specs], {"long_name": "seed"}),
                "optimizer": ("run", [s.optimizer for s in specs], {"long_name": "optimizer"}),
                "run_dir": ("run", [f"runs/{s.name}" for s in specs], {"long_name": "checkpoint folder"}),
            },
            variables=train_variables(loss), unit_dims=("run",), chunks={"run": 1},
            attrs={"dataset": data.name, "model": cfg.model, "lr_scaling": cfg.lr_scaling, "loss": loss,
                   "task": task_record(data=cfg.data, loss=loss, model=cfg.model, collate=cfg.collate),
                   "checkpoint_epochs": list(checkpoint_epochs(cfg)), "n_train": len(data.train),
                   # batch sizes whose epochs leave out a last single-example batch (train-mode batch norm)
                   **({"dropped_last_batch": list(dropped)} if dropped else {})})

    def units(self) -> Sequence[Unit]:
        return [Unit({"run": s.index}, s.name, work=self.cfg.epochs) for s in expand_grid(self.cfg)]

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        from gradlab import train_loop

        spec = expand_grid(self.cfg)[int(unit.region["run"])]
        run_dir = Path(self.out) / "runs" / spec.name
        if run_dir.exists():  # a crashed earlier attempt: its checkpoints are rewritten identically
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        return train_loop.train_run(self.cfg, state, spec, run_dir, tick=ctx.tick)

    def on_failure(self, writer: Any, created: bool) -> None:
        if created:  # the store is removed (nothing done): so are its checkpoints
            shutil.rmtree(Path(self.out) / "runs", ignore_errors=True)
