"""The train store's variables (``gradlab train``: dims run, epoch, layer, group; coords in
:class:`gradlab.train_job.TrainJob`)."""

from __future__ import annotations

from gradlab.store import VarSpec


def train_variables(loss: str = "cross-entropy") -> list[VarSpec]:
    re_ = ("run", "epoch")
    units = "nats" if loss in ("cross-entropy", "lm") else "loss"
    what = {"lm": "token cross-entropy"}.get(loss, loss)
    return [
        VarSpec("train_loss", re_, "float64", f"training loss (mean {what})", units),
        VarSpec("train_acc", re_, "float64", "training accuracy (NaN unless classification)", "1"),
        VarSpec("test_loss", re_, "float64", f"test loss (mean {what})", units),
        VarSpec("test_acc", re_, "float64", "test accuracy (NaN unless classification)", "1"),
        VarSpec("lr_used", re_, "float64", "learning rate applied at the epoch's last step (η̃ under sum reduction)",
                "1"),
        VarSpec("dist_init_layer", (*re_, "layer"), "float64", "distance from init ‖θ − θ₀‖", "parameter unit"),
        VarSpec("cos_init_layer", (*re_, "layer"), "float64", "cosine to init cos(θ, θ₀)", "1"),
        VarSpec("dist_init", (*re_, "group"), "float64", "distance from init ‖θ − θ₀‖", "parameter unit"),
        VarSpec("dist_origin", (*re_, "group"), "float64", "distance from origin ‖θ‖", "parameter unit"),
        VarSpec("diverged_epoch", ("run",), "int64", "epoch at which the loss became non-finite (-1: never)", "epoch",
                fill=-1),
    ]
