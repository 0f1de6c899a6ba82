"""The model zoo: every model builds by name for digits/MNIST/CIFAR shapes, batch norm and ghost batch norm."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from gradlab.errors import UsageError
from gradlab.models import build_model
from gradlab.models.norm import GhostBatchNorm
from gradlab.models.resnet import BasicBlock

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
TINY = {"cnn": {"channels": (3, 4), "hidden": 8}, "vgg": {"width": 1 / 32}, "resnet": {"depth": 8, "width": 4}}


def _build(name: str, shape: tuple[int, ...], n_classes: int = 7, **kw: object) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(name, shape, n_classes, **{**TINY[name], **kw})


def _x(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=["digits", "mnist", "cifar"])
@pytest.mark.parametrize("name", ["cnn", "vgg", "resnet"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_forward_shape_and_every_parameter_gets_a_gradient(name: str, shape: tuple[int, ...], batch_norm: bool) -> None:
    model = _build(name, shape, batch_norm=batch_norm)
    out = model(_x(3, shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    expected = {"cnn": 2, "vgg": 10, "resnet": 1 + 2 * 3}[name] if batch_norm else 0
    assert n_bn == expected


def _plain_twin(ghost: nn.Module, name: str, shape: tuple[int, ...]) -> nn.Module:
    """The same weights with plain BatchNorm2d in place of every GhostBatchNorm."""
    plain = _build(name, shape, batch_norm=True)
    state = {k.replace(".bn.", "."): v for k, v in ghost.state_dict().items()}
    plain.load_state_dict(state, strict=True)
    return plain


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["digits", "cifar"])
@pytest.mark.parametrize("name", ["cnn", "vgg", "resnet"])
def test_ghost_batch_norm_equals_plain_batch_norm_on_each_virtual_batch(name: str, shape: tuple[int, ...]) -> None:
    ghost = _build(name, shape, batch_norm=True, ghost_batch_size=4)
    assert any(isinstance(m, GhostBatchNorm) for m in ghost.modules())
    plain = _plain_twin(ghost, name, shape)
    x = _x(10, shape)  # virtual batches of 4, 4 and 2
    ghost.train()
    plain.train()
    out = ghost(x)
    reference = torch.cat([plain(chunk) for chunk in x.split(4)])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # statistics over the whole batch give a different answer, so the check above has teeth
    full = _plain_twin(ghost, name, shape).train()(x)
    assert (full - out).abs().max() > 1e-3
    # running statistics were updated once per virtual batch in both, so evaluation agrees too
    ghost.eval()
    plain.eval()
    torch.testing.assert_close(ghost(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46)])
def test_resnet_parameter_count_matches_he_et_al_table_6(depth: int, millions: float) -> None:
    model = build_model("resnet", (3, 32, 32), 10, depth=depth)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_resnet_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = BasicBlock(4, 8, stride=2, batch_norm=True, ghost_batch_size=None)
    x = _x(2, (4, 6, 6))
    s = block.shortcut(x)
    assert s.shape == (2, 8, 3, 3)
    torch.testing.assert_close(s[:, 2:6], x[:, :, ::2, ::2])
    assert s[:, :2].abs().sum() == 0 and s[:, 6:].abs().sum() == 0


@pytest.mark.parametrize("depth", [21, 2, 0, 19.5])
def test_resnet_invalid_depth_names_valid_depths(depth: float) -> None:
    with pytest.raises(UsageError, match=r"6n\+2.*20, 32"):
        build_model("resnet", (3, 32, 32), 10, depth=depth)


@pytest.mark.parametrize(("config", "n_convs"), [("vgg11", 8), ("vgg13", 10), ("vgg16", 13)])
def test_vgg_configs_have_the_paper_conv_counts(config: str, n_convs: int) -> None:
    model = build_model("vgg", (3, 32, 32), 10, config=config, width=1 / 64)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs


@pytest.mark.parametrize(("shape", "n_pools"), [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5)])
def test_vgg_skips_pools_once_the_map_is_1x1(shape: tuple[int, ...], n_pools: int) -> None:
    model = _build("vgg", shape)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == n_pools
    assert model.features(_x(2, shape)).shape[-2:] == (1, 1)


def test_vgg_width_multiplier_scales_channels() -> None:
    model = build_model("vgg", (3, 32, 32), 10, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128, 128, 128]


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("transformer", {}, "unknown model 'transformer'.*cnn"),
        ("cnn", {"depth": 3}, "bad keyword arguments"),
        ("vgg", {"config": "vgg19"}, "unknown VGG config 'vgg19'"),
        ("vgg", {"width": 0}, "width"),
        ("cnn", {"channels": ()}, "channels"),
        ("resnet", {"width": 0}, "width"),
    ],
)
def test_bad_model_name_or_kwargs_is_a_usage_error(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build_model(name, (1, 8, 8), 10, **kwargs)


def test_models_reject_flat_inputs() -> None:
    with pytest.raises(UsageError, match="image inputs"):
        build_model("cnn", (64,), 10)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "gl_user_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def make(input_shape, n_classes, hidden=4):
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

        def not_a_model(hidden=4):
            return "nope"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gl_user_models"


def test_user_factory_builds_with_shape_and_kwargs(user_module: str) -> None:
    model = build_model(f"{user_module}:make", (1, 8, 8), 3, hidden=5)
    assert model(_x(2, (1, 8, 8))).shape == (2, 3)
    assert model[1].out_features == 5


@pytest.mark.parametrize(("attr", "match"), [("not_a_model", "expected a torch nn.Module"),
                                             ("missing", "no attribute")])
def test_bad_user_factory_is_a_usage_error(user_module: str, attr: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build_model(f"{user_module}:{attr}", (1, 8, 8), 3)


def test_unimportable_user_module_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot import module"):
        build_model("gl_no_such_module_xyz:make", (1, 8, 8), 3)
