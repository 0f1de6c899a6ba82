"""``gradlab sharpness`` as a job of the one runner (:mod:`gradlab.runner`): one unit per checkpoint (all its
curvature measurements, :func:`gradlab.curvature.measure.measure_checkpoint`); the finalize step evaluates
Keskar's parametric interpolation once (its own ``interp_done`` mask)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradlab.curvature.config import DTYPES, SharpnessConfig, prepare
from gradlab.curvature.layout import _template, alphas_for, config_dict
from gradlab.curvature.measure import measure_checkpoint
from gradlab.runner import Job, Template, Unit, UnitContext


@dataclass(frozen=True)
class SharpnessJob(Job):
    """The sharpness store of one :class:`~gradlab.curvature.config.SharpnessConfig` (its loss resolved)."""

    config: SharpnessConfig
    kind: ClassVar[str] = "sharpness"
    progress_desc: ClassVar[str] = "Hessian-vector products"
    progress_unit: ClassVar[str] = "HVP"

    def config_dict(self) -> dict[str, Any]:
        return config_dict(self.config)

    def input_files(self) -> Sequence[str]:
        return [*self.config.checkpoints, *(self.config.interpolate or ())]

    def fingerprints(self) -> dict[str, str]:
        """The data's tensors (train and test splits: the sample and the evaluations) and the first model."""
        from gradlab.task import data_sha256, model_sha256

        prep = self.state()
        splits = [prep.data.train.batch] + ([prep.data.test.batch] if prep.data.test is not None else [])
        return {"data_content": data_sha256(*splits), "model_architecture": model_sha256(prep.models[0])}

    def template(self) -> Template:
        t = _template(self.config, self.state())
        return Template(sizes=t["sizes"], coords=t["coords"], variables=t["variables"], unit_dims=("checkpoint",),
                        chunks={"checkpoint": 1}, attrs=t["attrs"])

    def units(self) -> Sequence[Unit]:
        return [Unit({"checkpoint": c}, label, work=0) for c, label in enumerate(self.state().labels)]

    def prepare(self) -> Any:
        return prepare(self.config)

    def on_skip(self, unit: Unit, ctx: UnitContext) -> None:
        ctx.say(f"checkpoint {unit.label}: already done")

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        c = int(unit.region["checkpoint"])
        ctx.say(f"checkpoint {unit.label}: measuring ({state.n_params[c]} parameters)")
        return measure_checkpoint(self.config, state, c, ctx.say, lambda: ctx.tick(1))

    def finalize(self, writer: Any, ctx: UnitContext) -> None:
        from gradlab.curvature.interpolation import parametric_curve

        config = self.config
        if config.interpolate is None or bool(writer.read("interp_done").all()):
            return
        ctx.say("interpolation: evaluating")
        state = self.state()  # the interpolation's end points and data
        splits = {"train": state.data.train.batch}
        if state.data.test is not None:
            splits["test"] = state.data.test.batch
        small, large = state.interp_states
        curve = parametric_curve(state.interp_template, small, large, alphas_for(config), splits,
                                 loss=config.loss, dtype=DTYPES[config.dtype], device=config.device)
        for key, values in curve.items():
            writer.write(f"interp_{key}", {}, values)
        writer.write("interp_done", {}, np.ones(config.alpha_points, dtype=bool))


def resolved(config: SharpnessConfig, prep: Any) -> SharpnessConfig:
    """The config with the data's own loss filled in ("cross_entropy" keeps a classification store unchanged)."""
    if config.loss is not None:
        return config
    import dataclasses

    return dataclasses.replace(config, loss="cross_entropy" if prep.data.loss == "cross-entropy" else prep.data.loss)


