"""Parameters a model's factory freezes (``requires_grad=False``) are left out of the probe, as training leaves them:
not selected, not in ‖S‖, ‖G‖² or tr Σ, never stepped by the step protocol; said once on stderr, recorded in the
store's attrs; a ``--params`` matching only frozen tensors is refused in one line.  Numbers against float64 brute
force (per-example autograd over the trainable parameters; a plain SGD loop that steps only them)."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from gradlab.cli import main
from gradlab.store import lock_path

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def frozen():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        for p in m[0].parameters():
            p.requires_grad_(False)
        return m

    def cls():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=g)
        return x, x[:, :3].argmax(1)
''')


@pytest.fixture()
def user(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "frozmod.py").write_text(MODULE)
    sys.modules.pop("frozmod", None)
    import frozmod

    net = frozmod.frozen()
    with torch.no_grad():  # a checkpoint away from the factory's init
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ckpt = tmp_path / "frozen.pt"
    torch.save(net.state_dict(), ckpt)
    yield {"module": frozmod, "ckpt": ckpt}
    sys.modules.pop("frozmod", None)


def argv(user, out, protocol, *extra):
    return ["probe", "--checkpoint", str(user["ckpt"]), "--model", "frozmod:frozen", "--data", "frozmod:cls",
            "--protocol", protocol, "--dtype", "float64", "--out", str(out), "--no-progress", *extra]


def model64(user):
    net = user["module"].frozen()
    net.load_state_dict(torch.load(user["ckpt"]))
    return net.double()


def test_frozen_protocol_leaves_frozen_parameters_out_of_every_number(user, tmp_path, caplog):
    out = tmp_path / "f.zarr"
    assert main(argv(user, out, "frozen", "--budget", "64", "--batch-sizes", "1,4,16,64", "--trials", "2")) == 0
    said = [r.getMessage() for r in caplog.records if "frozen parameter" in r.getMessage()]
    assert len(said) == 1 and "leaving out 2 frozen parameter tensor(s)" in said[0] and "0.weight, 0.bias" in said[0]
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["selected"] == ["2.weight", "2.bias"] and ds.attrs["frozen"] == ["0.weight", "0.bias"]
    assert ds.selected.values.tolist() == [False, False, True, True]

    net = model64(user).eval()
    x, y = user["module"].cls()
    x = x.double()
    trainable = [p for p in net.parameters() if p.requires_grad]
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), trainable)]) for i in range(64)])
    # the budget is the whole pool: the estimates are the pool's own ‖G‖² and tr Σ (1/n), exactly
    mean = g.mean(0)
    g2, tr = float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())
    np.testing.assert_allclose(ds.grad_sq_norm.values[0], g2, rtol=1e-9)
    np.testing.assert_allclose(ds.trace_cov.values[0], tr, rtol=1e-9)
    # ‖Σ_B gᵢ/m‖ of the full batch (m = 64) is ‖G‖ over the trainable parameters
    np.testing.assert_allclose(ds.grad_norm.sel(batch_size=64).values[0], float(g.mean(0).norm()), rtol=1e-9)
    assert np.isnan(ds.grad_norm_layer.values[0, :, :, :2]).all()


def test_step_protocol_never_steps_a_frozen_parameter(user, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(argv(user, out, "step", "--budget", "16", "--batch-sizes", "1,4,16", "--trials", "3",
                     "--lr", "0.1")) == 0
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["frozen"] == ["0.weight", "0.bias"]
    x, y = user["module"].cls()
    x = x.double()
    idx = ds.example_index.values[0]
    for i, m in enumerate(ds.batch_size.values):
        for t in range(idx.shape[0]):
            net = model64(user).train()
            ps = [p for p in net.parameters() if p.requires_grad]
            theta0 = [p.detach().clone() for p in net.parameters()]
            sums = [torch.zeros_like(p) for p in ps]
            for k in range(16 // m):
                b = torch.as_tensor(idx[t, k * m:(k + 1) * m])
                grads = torch.autograd.grad(F.cross_entropy(net(x[b]), y[b]), ps)
                with torch.no_grad():
                    for s, gg, p in zip(sums, grads, ps):
                        s += gg
                        p -= 0.1 * gg
            norm = float(torch.sqrt(sum((s ** 2).sum() for s in sums)))
            disp = float(torch.sqrt(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(net.parameters(), theta0))))
            np.testing.assert_allclose(ds.grad_norm.values[0, i, t], norm, rtol=1e-10)
            np.testing.assert_allclose(ds.displacement.values[0, i, t], disp, rtol=1e-10)


def test_params_naming_only_frozen_tensors_is_refused_in_one_line(user, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(argv(user, out, "frozen", "--budget", "16", "--batch-sizes", "4", "--params", r"^0\.")) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert "matches only frozen parameters (requires_grad=False: 0.weight, 0.bias)" in line
    assert "'2.weight', '2.bias'" in line and "Traceback" not in err
    assert not out.exists() and not lock_path(out).exists()


def test_the_api_leaves_a_live_models_frozen_parameters_out_too(user, tmp_path):
    import gradlab
    from gradlab.errors import UsageError

    net = model64(user)
    x, y = user["module"].cls()
    ds = gradlab.probe(net, data=(x.double(), y), out=tmp_path / "a.zarr", budget=16, batch_sizes=[4, 16],
                       trials=2)
    assert ds.attrs["selected"] == ["2.weight", "2.bias"] and ds.attrs["frozen"] == ["0.weight", "0.bias"]
    assert ds.attrs["dtype"] == "float64" and ds.attrs["dtype_cast"] == "none"
    with pytest.raises(UsageError, match=r"params= '\^0\\\\.' matches only frozen"):
        gradlab.probe(net, data=(x.double(), y), out=tmp_path / "b.zarr", budget=16, batch_sizes=[4], params=r"^0\.")
