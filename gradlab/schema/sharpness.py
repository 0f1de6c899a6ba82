"""The sharpness store's variables (``gradlab sharpness``; the table of dims and meanings is in
:mod:`gradlab.curvature.config`; coords and attrs in :mod:`gradlab.curvature.layout`)."""

from __future__ import annotations

from gradlab.store import VarSpec

HESSIAN_UNITS = "loss / parameter^2"
EXTRAPOLATION_MODEL = "lambda_max(m) = lambda_full + c*(1/m)*(N-m)/(N-1), WLS with weights trials/var_m"


def sharpness_variables(*, minibatch: bool, interpolate: bool) -> list[VarSpec]:
    """The variables of a sharpness store; ``minibatch``: with mini-batch λ_max (``--minibatch-sizes``);
    ``interpolate``: with Keskar's parametric plot (``--interpolate``)."""
    per = ("checkpoint",)
    H = HESSIAN_UNITS
    v = [
        VarSpec("train_loss", per, "float64", "training loss (whole training set, eval mode)", "loss"),
        VarSpec("train_accuracy", per, "float64", "training accuracy (whole training set)", "1"),
        VarSpec("test_loss", per, "float64", "test loss (whole test set, eval mode)", "loss"),
        VarSpec("test_accuracy", per, "float64", "test accuracy (whole test set)", "1"),
        VarSpec("sample_loss", per, "float64", "training loss L over the fixed sample", "loss"),
        VarSpec("grad_norm", per, "float64", "norm of the gradient of L over the sample", "loss / parameter"),
        VarSpec("lambda_max", per, "float64", "largest Hessian eigenvalue lambda_max (Lanczos)", H),
        VarSpec("eigenvalues", ("checkpoint", "k"), "float64", "top-k Hessian eigenvalues (Lanczos)", H),
        VarSpec("eigen_residual", ("checkpoint", "k"), "float64", "eigenpair residual norm ||Hv - lambda v||", H),
        VarSpec("lanczos_hvps", per, "int64", "Hessian-vector products used by Lanczos", "1"),
        VarSpec("lanczos_converged", per, "bool", "Lanczos met its tolerance", "1"),
        VarSpec("lanczos_check", per, "float64", "top Ritz value of a Lanczos check run deflated against the "
                "eigenvectors found (a lower bound on lambda_max)", H),
        VarSpec("lanczos_missed_top", per, "bool", "the check found an eigenvalue above lambda_max + residual "
                "(lambda_max is then only a lower bound)", "1"),
        VarSpec("hessian_trace", per, "float64", "Hessian trace (Hutchinson or Hutch++, Rademacher probes)", H),
        VarSpec("hessian_trace_stderr", per, "float64", "standard error of the trace estimate", H),
        VarSpec("trace_samples", ("checkpoint", "probe"), "float64",
                "per-probe trace sample (v^T H v; Hutch++: tr(Q^T H Q) + deflated g^T H g)", H),
        VarSpec("eps_sharpness", ("checkpoint", "space", "eps"), "float64",
                "epsilon-sharpness phi (Keskar et al. 2017, Metric 2.1)", "%"),
        VarSpec("eps_loss_max", ("checkpoint", "space", "eps"), "float64",
                "largest loss found in the epsilon box (L-BFGS-B)", "loss"),
        VarSpec("eps_n_evals", ("checkpoint", "space", "eps"), "int64", "loss evaluations used by L-BFGS-B", "1"),
    ]
    if minibatch:
        v += [
            VarSpec("minibatch_lambda_max", ("checkpoint", "batch_size", "trial"), "float64",
                    "lambda_max of the mini-batch Hessian", H),
            VarSpec("minibatch_lambda_full", per, "float64", "full-batch lambda_max extrapolated from mini-batches", H,
                    attrs={"model": EXTRAPOLATION_MODEL}),
            VarSpec("minibatch_lambda_full_stderr", per, "float64", "standard error of the extrapolated lambda_max",
                    H),
            VarSpec("minibatch_slope", per, "float64", "slope c of lambda_max(m) = lambda_full + c*x_m", H),
        ]
    if interpolate:
        for s in ("train", "test"):
            v += [VarSpec(f"interp_{s}_loss", ("alpha",), "float64", f"{s} loss along the interpolation", "loss"),
                  VarSpec(f"interp_{s}_accuracy", ("alpha",), "float64", f"{s} accuracy along the interpolation",
                          "1")]
        v.append(VarSpec("interp_done", ("alpha",), "bool", "interpolation point finished", "1"))
    return v
