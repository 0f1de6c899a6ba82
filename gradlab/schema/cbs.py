"""The cbs store's variables (``gradlab cbs``: dims checkpoint, batch_size, lr_factor, seed, eval; coords and attrs
in :class:`gradlab.cbs.job.CbsJob`)."""

from __future__ import annotations

from gradlab.store import VarSpec


def cbs_variables(loss: str, *, eval_examples: int, diverge_factor: float) -> list[VarSpec]:
    """The variables of a cbs store; ``eval_examples``: the fixed training examples its training loss is
    evaluated on; ``diverge_factor``: the loss ratio above which a branch counts as diverged."""
    what = {"lm": "token cross-entropy"}.get(loss, loss)
    units = "nats" if loss in ("cross-entropy", "lm") else "loss"
    b = ("checkpoint", "batch_size", "lr_factor", "seed")
    return [
        VarSpec("train_loss", (*b, "eval"), "float64",
                f"training loss (mean {what} on {eval_examples} fixed training examples)", units),
        VarSpec("test_loss", (*b, "eval"), "float64", f"held-out loss (mean {what} on the test split)", units),
        VarSpec("lr", ("checkpoint", "batch_size", "lr_factor"), "float64", "learning rate of the branch", "1"),
        VarSpec("diverged_step", b, "int64", "first eval step with a non-finite loss or one above "
                f"{diverge_factor:g}× the checkpoint's (-1: never)", "steps", fill=-2),
    ]
