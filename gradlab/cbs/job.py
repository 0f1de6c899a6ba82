"""``gradlab cbs`` as a job for the shared runner: branches from checkpoints at every batch size of a grid.

From each checkpoint θ_c, for each batch size m of the grid, each learning-rate factor f and each seed s, one
*branch* continues training for the same budget of N examples (K = N/m steps, m must divide N) with learning rate
η(c, m, f) = f · rule(η_c, m / m_c), where η_c is the rate applied at the checkpoint (``lr_applied`` in the meta
``gradlab train`` writes; ``--lr`` overrides), m_c the checkpoint's training batch size (``--base-batch-size``
overrides) and ``rule`` is ``constant`` (η_c), ``linear`` (η_c·m/m_c, Goyal et al. 2017) or ``sqrt``
(η_c·√(m/m_c), Hoffer et al. 2017).  Optimizer and momentum come from the checkpoint's recipe unless overridden.
Losses are recorded on a fixed training subset and on the held-out split at eval points e_j = round(j·N/J)
examples (j = 0..J), i.e. after step ⌈e_j/m⌉ of batch size m (``examples_seen`` holds the exact count).

Seeds: seed s's example stream is a sequence of random permutations of the training set drawn from
``SeedSequence([seed, s])``; branch (c, m, f, s) takes its first N examples in order.  Every checkpoint, batch
size and learning rate of a seed sees the same examples (common random numbers: differences between batch sizes
are paired), and a unit's numbers depend only on the config and its coordinates.

Units: one unit = one (checkpoint, batch size): its F × R branches (learning-rate factors × seeds) advance in
lock-step (:mod:`gradlab.cbs.engine`).  A branch is the progress unit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from gradlab.errors import UsageError
from gradlab.runner import Job, Template, Unit, UnitContext
from gradlab.schema.cbs import cbs_variables

LR_SCALINGS = ("constant", "linear", "sqrt")
OPTIMIZERS = ("sgd", "adam")
ENGINES = ("auto", "chain", "loop")


@dataclass(frozen=True)
class BranchPoint:
    """One checkpoint branched from: label, file and digest, and the training recipe its branches continue."""

    label: str
    path: str
    sha256: str
    epoch: float
    optimizer: str
    momentum: float
    base_lr: float  # η_c: the rate applied at the checkpoint (mean reduction)
    base_batch_size: int  # m_c
    step: int = -1  # the training step of the checkpoint (meta "step"; -1 unknown): matches monitor stores
    # the training run the checkpoint comes from (canonical JSON of the meta's IDENTITY_KEYS it records, "{}": none),
    # checked against a monitor store's config before its B_noise is taken at ``step``
    identity: str = "{}"


IDENTITY_KEYS = ("run", "seed", "batch_size", "lr", "optimizer", "reduction", "dataset")


def identity_of(meta: dict[str, Any]) -> str:
    """The training-run identity a checkpoint's meta records (``gradlab train`` writes all of IDENTITY_KEYS), as
    canonical JSON; only JSON scalars are kept."""
    keep = {k: meta[k] for k in IDENTITY_KEYS
            if isinstance(meta.get(k), (str, int, float, bool)) and not (isinstance(meta[k], float) and
                                                                        not math.isfinite(meta[k]))}
    return json.dumps(keep, sort_keys=True)


@dataclass(frozen=True)
class CbsJob(Job):
    """The resolved config of a ``gradlab cbs`` store (everything the numbers depend on); see the module docs."""

    kind: ClassVar[str] = "cbs"
    progress_unit: ClassVar[str] = "branch"

    checkpoints: tuple[BranchPoint, ...]
    data: str
    model: str | None
    model_kwargs_json: str
    loss: str
    collate: str | None
    batch_sizes: tuple[int, ...]
    budget: int
    lr_scaling: str
    lr_factors: tuple[float, ...]
    seeds: int
    seed: int
    weight_decay: float
    n_evals: int
    eval_examples: int
    dtype: str
    engine: str
    diverge_factor: float
    input_shape: tuple[int, ...]
    n_classes: int
    pool_size: int
    tokens_per_example: int
    # L₀, the loss of the zero output on the eval subset (log C for cross-entropy): a branch diverges above
    # max(diverge_factor × its checkpoint's loss, L₀) (gradlab.cbs.engine); None: factor × the checkpoint's alone
    diverge_reference: float | None = None

    # -- the runner's contract ------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = [asdict(c) for c in self.checkpoints]
        return json.loads(json.dumps(d))

    def input_files(self) -> list[str]:
        return [c.path for c in self.checkpoints]

    def lr(self, c: int, m: int) -> float:
        """η(c, m) before the factor f: the rule applied to the checkpoint's rate."""
        bp = self.checkpoints[c]
        ratio = m / bp.base_batch_size
        return bp.base_lr * {"constant": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def eval_examples_grid(self) -> np.ndarray:
        return np.round(np.arange(self.n_evals + 1) * self.budget / self.n_evals).astype(np.int64)

    def eval_steps(self, m: int) -> np.ndarray:
        return -(-self.eval_examples_grid() // m)

    def template(self) -> Template:
        C, M, F, R, J = (len(self.checkpoints), len(self.batch_sizes), len(self.lr_factors), self.seeds,
                         self.n_evals + 1)
        steps = np.stack([self.eval_steps(m) for m in self.batch_sizes])
        ex = {"long_name": "examples", "units": "examples"}
        coords = {
            "checkpoint": ("checkpoint", [c.label for c in self.checkpoints], {"long_name": "checkpoint"}),
            "checkpoint_epoch": ("checkpoint", [c.epoch for c in self.checkpoints],
                                 {"long_name": "epoch of the checkpoint", "units": "epoch"}),
            "checkpoint_step": ("checkpoint", [c.step for c in self.checkpoints],
                                {"long_name": "training step of the checkpoint (-1: unknown)", "units": "steps"}),
            "batch_size": ("batch_size", list(self.batch_sizes), {"long_name": "batch size", "units": "examples"}),
            "lr_factor": ("lr_factor", list(self.lr_factors),
                          {"long_name": "learning-rate factor f (η = f · rule(η_c, m))", "units": "1"}),
            "seed": ("seed", list(range(self.seeds)), {"long_name": "seed (example stream)"}),
            "eval": ("eval", list(range(J)), {"long_name": "evaluation point"}),
            "examples": ("eval", self.eval_examples_grid(), {**ex, "long_name": "examples budgeted at the eval"}),
            "steps": (("batch_size", "eval"), steps, {"long_name": "optimizer steps", "units": "steps"}),
            "examples_seen": (("batch_size", "eval"), steps * np.array(self.batch_sizes)[:, None],
                              {**ex, "long_name": "examples seen"}),
        }
        variables = [dataclasses.replace(v, long_name=self.diverge_rule("first eval step with")
                                         + " (-1: never)") if v.name == "diverged_step" else v
                     for v in cbs_variables(self.loss, eval_examples=self.eval_examples,
                                            diverge_factor=self.diverge_factor)]
        attrs = {"dataset": self.data, "loss": self.loss, "budget": self.budget, "lr_scaling": self.lr_scaling,
                 "diverge_factor": self.diverge_factor,
                 "diverge_reference": -1.0 if self.diverge_reference is None else self.diverge_reference,
                 "diverge_rule": self.diverge_rule("diverged:"),
                 "tokens_per_example": self.tokens_per_example, "n_train": self.pool_size,
                 "seed_derivation": "example stream of seed s: permutations from SeedSequence([seed, s])"}
        return Template(sizes={"checkpoint": C, "batch_size": M, "lr_factor": F, "seed": R, "eval": J},
                        coords=coords, variables=variables, unit_dims=("checkpoint", "batch_size"),
                        chunks={"checkpoint": 1, "batch_size": 1}, attrs=attrs)

    def diverge_rule(self, lead: str) -> str:
        """The divergence criterion in words (the store's long_name and attrs say it)."""
        f = f"{self.diverge_factor:g}"
        if self.diverge_reference is None:
            return f"{lead} a non-finite training loss or one above {f}× the checkpoint's"
        return (f"{lead} a non-finite training loss or one above both {f}× the checkpoint's and "
                f"{self.diverge_reference:.4g} (the loss of the zero output)")

    def units(self) -> list[Unit]:
        work = len(self.lr_factors) * self.seeds
        return [Unit(region={"checkpoint": c, "batch_size": i}, label=f"{bp.label}, batch size {m}", work=work)
                for c, bp in enumerate(self.checkpoints) for i, m in enumerate(self.batch_sizes)]

    def prepare(self) -> dict[str, Any]:
        return _prepare(self)

    def fingerprints(self) -> dict[str, str]:
        """The data's tensors (the training split the branches draw from, in the run dtype, and the held-out split)
        and the first checkpoint's model: a resume after either changed is refused."""
        from gradlab.task import data_sha256, model_sha256

        state = self.state()
        return {"data_content": data_sha256(state["train_batch"], state["eval_test_batch"]),
                "model_architecture": model_sha256(state["models"][0])}

    def compute(self, state: dict[str, Any], unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        import torch

        from gradlab.cbs import engine

        c, i = unit.region["checkpoint"], unit.region["batch_size"]
        m, F, R = self.batch_sizes[i], len(self.lr_factors), self.seeds
        model = state["models"][c]
        bp = self.checkpoints[c]
        lrs = np.repeat([f * self.lr(c, m) for f in self.lr_factors], R)
        stream = np.tile(state["streams"], (F, 1))
        recipe = engine.Recipe(bp.optimizer, bp.momentum, self.weight_decay)
        dtype = getattr(torch, self.dtype)
        common = dict(dtype=dtype, diverge_factor=self.diverge_factor, diverge_reference=self.diverge_reference)
        if state["chain"]:
            x, y = state["train"]
            curves = engine.chain_branches(model, x, y, state["eval_train"], state["eval_test"], stream, lrs, m,
                                           self.eval_steps(m), recipe, **common)
        else:
            curves = engine.loop_branches(model, state["loss_fn"], state["train_batch"], state["eval_train_batch"],
                                          state["eval_test_batch"], stream, lrs, m, self.eval_steps(m), recipe,
                                          **common)
        ctx.tick(F * R)
        shape = (F, R, self.n_evals + 1)
        return {"train_loss": curves.train_loss.reshape(shape), "test_loss": curves.test_loss.reshape(shape),
                "lr": lrs.reshape(F, R)[:, 0], "diverged_step": curves.diverged_step.reshape(F, R)}

    def on_result(self, unit: Unit, result: Any, ctx: UnitContext) -> dict[str, float]:
        n_div = int((np.asarray(result["diverged_step"]) >= 0).sum())
        if n_div:
            ctx.say(f"{n_div} of {np.asarray(result['diverged_step']).size} branches diverged at {unit.label} "
                    "(recorded; the analysis leaves them out)")
        return {"diverged": n_div}


def example_stream(seed: int, s: int, n: int, pool: int) -> np.ndarray:
    """The first ``n`` examples of seed ``s``'s stream: random permutations of range(pool), one after another."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(s)]))
    reps = -(-n // pool)
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


def eval_subset(seed: int, pool: int, k: int) -> np.ndarray:
    """The fixed training examples the training loss is evaluated on (sorted), from ``SeedSequence([seed, 2**32])``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2**32]))
    return np.sort(rng.choice(pool, size=min(k, pool), replace=False))


def _prepare(job: CbsJob) -> dict[str, Any]:
    import torch

    from gradlab.cbs.engine import supports_chain
    from gradlab.task import index_batch, resolve_loss, to_run

    bundle = _bundle(job.data, job.collate)
    dtype = getattr(torch, job.dtype)
    train = to_run(bundle.train.batch, dtype=dtype)
    test = to_run(bundle.test.batch, dtype=dtype)
    sub = torch.as_tensor(eval_subset(job.seed, job.pool_size, job.eval_examples))
    models = [_model(job, c).to(dtype=dtype) for c in range(len(job.checkpoints))]
    chain = job.engine == "chain" or (job.engine == "auto" and supports_chain(models[0], job.loss, _x(train)))
    state: dict[str, Any] = {"models": models, "chain": chain, "loss_fn": resolve_loss(job.loss),
                             "streams": np.stack([example_stream(job.seed, s, job.budget, job.pool_size)
                                                  for s in range(job.seeds)]),
                             "train_batch": train, "eval_train_batch": index_batch(train, sub),
                             "eval_test_batch": test}
    if chain:
        state["train"] = train
        state["eval_train"] = index_batch(train, sub)
        state["eval_test"] = test
    return state


def _x(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch


def _bundle(data: str, collate: str | None) -> Any:  # not cached: a changed data file is read afresh
    from gradlab.datasets import load_data

    return load_data(data, collate=collate)


def _model(job: CbsJob, c: int) -> Any:
    from gradlab.checkpoint import build_model_from, checkpoint_sha256, load_checkpoint

    bp = job.checkpoints[c]
    if checkpoint_sha256(bp.path) != bp.sha256:
        raise UsageError(f"{bp.path} changed since the cbs store was made (SHA-256 differs); restore it or start a "
                         "new store")
    return build_model_from(load_checkpoint(bp.path), model=job.model, model_kwargs=json.loads(job.model_kwargs_json),
                            input_shape=job.input_shape, n_classes=job.n_classes)


def tokens_per_example(bundle: Any, loss: str) -> int:
    """Tokens per example of a language-modelling task (its labelled positions), else 1."""
    if loss != "lm":
        return 1
    y = bundle.train.y
    return int(y.shape[1]) if getattr(y, "ndim", 1) == 2 else 1


__all__ = ["BranchPoint", "CbsJob", "IDENTITY_KEYS", "identity_of", "LR_SCALINGS", "OPTIMIZERS", "ENGINES",
           "example_stream", "eval_subset", "tokens_per_example"]

