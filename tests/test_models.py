"""models/: shapes, parameter counts, seeding, dropout, and backprop checked against centred
differences. Pure torch, CPU, no Ray."""
import ast
import pathlib
import pickle

import pytest
import torch
import torch.nn.functional as F

from models import MODEL_NAMES, ImportedFactory, RegistryFactory, build_model, import_factory
from models.conv import Maxout

MODELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "models"
EPS = 1e-4
COORDS_PER_TENSOR = 10


def _batch(n: int = 2, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_keep_their_order():
    assert MODEL_NAMES[:6] == ("mlp30", "mlp100", "net_b", "net_c", "net_d", "net_h")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_is_logits_of_shape_b_by_10(name):
    x, _ = _batch(n=3)
    out = build_model(name).eval()(x)
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32
    # raw logits, not probabilities: rows need not sum to 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mlp30", 784 * 30 + 30 + 30 * 10 + 10),
        ("mlp100", 784 * 100 + 100 + 100 * 10 + 10),
        ("net_b", (20 * 25 + 20) + (2880 * 100 + 100) + (100 * 10 + 10)),
        ("net_c", (20 * 25 + 20) + (40 * 20 * 25 + 40) + (640 * 100 + 100) + (100 * 10 + 10)),
        ("net_d", (20 * 25 + 20) + (40 * 20 * 25 + 40) + (640 * 100 + 100) + (100 * 10 + 10)),
        (
            "net_h",
            (20 * 25 + 20) + (40 * 20 * 25 + 40) + (640 * 1000 + 1000)
            + (1000 * 1000 + 1000) + (1000 * 10 + 10),
        ),
    ],
)
def test_parameter_counts(name, expected):
    assert _n_params(build_model(name)) == expected


def test_parameter_counts_headline_numbers():
    assert _n_params(build_model("net_b")) == 289_630
    assert _n_params(build_model("net_h")) == 1_672_570 > 1_000_000


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'") as exc:
        build_model("resnet")
    for name in MODEL_NAMES:
        assert name in str(exc.value)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_dropout_is_rejected(bad):
    with pytest.raises(ValueError, match="dropout"):
        build_model("net_h", dropout=bad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seed_fixes_initialisation(name):
    def params(seed):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in build_model(name).parameters()]

    a, b, c = params(1), params(1), params(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("name", ["net_b", "net_c", "net_d", "net_h", "net_d_maxout"])
def test_conv_nets_start_with_zero_softmax_layer(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert not model.classifier[-1].weight.any() and not model.classifier[-1].bias.any()
    # every other weight is N(0, 1/n_in): check the first conv's spread (fan_in 25)
    conv = model.features[0]
    assert conv.weight.std().item() == pytest.approx(25**-0.5, rel=0.2)


def test_net_h_dropout_is_on_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model("net_h")
    with torch.no_grad():
        model.classifier[-1].weight.normal_(0, 0.1)  # zero-initialised layer would hide dropout
    x, _ = _batch(n=4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_dropout_zero_override_makes_train_mode_deterministic():
    torch.manual_seed(0)
    model = build_model("net_h", dropout=0.0).train()
    with torch.no_grad():
        model.classifier[-1].weight.normal_(0, 0.1)
    x, _ = _batch(n=4)
    assert torch.equal(model(x), model(x))


def _record_kinks(model: torch.nn.Module, patterns: list[torch.Tensor]) -> None:
    """Record, on every forward, which side of each kink the network is on: the argmax of every
    max-pool window and the sign of every ReLU input."""

    def pool_hook(module, inputs, _):
        _, idx = F.max_pool2d(inputs[0], module.kernel_size, module.stride, return_indices=True)
        patterns.append(idx)

    def relu_hook(_module, inputs, _):
        patterns.append(inputs[0] > 0)

    def maxout_hook(module, inputs, _):  # which piece wins in every group
        x = inputs[0]
        patterns.append(x.reshape(x.shape[0], -1, module.pieces, *x.shape[2:]).argmax(dim=2))

    for m in model.modules():
        if isinstance(m, torch.nn.MaxPool2d):
            m.register_forward_hook(pool_hook)
        elif isinstance(m, torch.nn.ReLU):
            m.register_forward_hook(relu_hook)
        elif isinstance(m, Maxout):
            m.register_forward_hook(maxout_hook)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backprop_matches_centred_differences(name):
    torch.manual_seed(0)
    model = build_model(name).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero softmax layer would make the check trivial
            p.normal_(0.0, 0.1)
    x, y = _batch(n=2, seed=1, dtype=torch.float64)
    patterns: list[torch.Tensor] = []
    _record_kinks(model, patterns)

    def loss() -> tuple[float, list[torch.Tensor]]:
        patterns.clear()
        value = F.cross_entropy(model(x), y)
        return value, list(patterns)

    model.zero_grad()
    value, base = loss()
    value.backward()

    def same_side(other: list[torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(base, other))

    g = torch.Generator().manual_seed(2)
    checked_total = nonzero = 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            flat, grad = p.data.view(-1), p.grad.view(-1)
            checked = 0
            for i in torch.randperm(flat.numel(), generator=g)[: 3 * COORDS_PER_TENSOR].tolist():
                w = flat[i].item()
                flat[i] = w + EPS
                up, up_side = loss()
                flat[i] = w - EPS
                down, down_side = loss()
                flat[i] = w
                # Max-pool and ReLU make the loss only piecewise smooth: a 1e-4 step that flips a
                # pool window's argmax or a ReLU's sign straddles a kink, where no derivative exists.
                if not (same_side(up_side) and same_side(down_side)):
                    continue
                numeric = (up.item() - down.item()) / (2 * EPS)
                torch.testing.assert_close(
                    grad[i].item(), numeric, rtol=1e-4, atol=1e-7, msg=lambda m: f"{pname}[{i}]: {m}"
                )
                nonzero += abs(numeric) > 1e-9
                checked += 1
                if checked == COORDS_PER_TENSOR:
                    break
            assert checked >= min(COORDS_PER_TENSOR, flat.numel()) // 2, f"{pname}: too many kinks"
            checked_total += checked
    assert nonzero > checked_total // 2


def test_models_do_not_import_ray():
    files = sorted(MODELS_DIR.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert not {"ray", "ray_train"} & set(roots), f"{path.name} imports {roots}"


# Sums of every parameter at seed 0, computed with the networks as they were before input shapes,
# classes and inits became options: a change that alters initialisation (and so every run's
# numbers) fails here.
PINNED = {
    "mlp30": {"net.1.weight": -3.180311, "net.1.bias": 4.213326, "net.4.weight": -0.001876, "net.4.bias": 0.536845},
    "net_b": {"features.0.weight": -0.673174, "features.0.bias": 0.269489, "classifier.1.weight": -19.110022,
              "classifier.1.bias": -6.235326},
    "net_d": {"features.0.weight": -12.75178, "features.3.bias": -6.999251, "classifier.1.weight": -6.458232},
    "net_h": {"classifier.1.bias": 55.941277, "classifier.4.weight": -4.213169, "classifier.4.bias": 10.893504},
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_initialisation_is_pinned(name):
    torch.manual_seed(0)
    state = build_model(name).state_dict()
    for key, total in PINNED[name].items():
        assert float(state[key].sum()) == pytest.approx(total, abs=1e-4), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_other_input_shapes_and_class_counts(name):
    model = build_model(name, input_shape=(3, 20, 24), num_classes=4).eval()
    assert model(torch.rand(5, 3, 20, 24)).shape == (5, 4)


@pytest.mark.parametrize("name,side", [("net_b", 6), ("net_d", 16), ("net_h", 16)])
def test_too_small_images_name_the_minimum(name, side):
    with pytest.raises(ValueError, match=f"{name} needs images of at least {side}x{side}"):
        build_model(name, input_shape=(1, side - 1, side - 1))
    assert build_model(name, input_shape=(1, side, side)).eval()(torch.rand(1, 1, side, side)).shape == (1, 10)


def test_normal_init_draws_weights_from_n01():
    torch.manual_seed(0)
    scaled, normal = build_model("mlp100"), None
    torch.manual_seed(0)
    normal = build_model("mlp100", init="normal")
    assert normal.net[1].weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert scaled.net[1].weight.std().item() == pytest.approx(784**-0.5, rel=0.05)
    assert normal.net[-1].weight.std().item() == pytest.approx(1.0, rel=0.2)  # the output layer too (network2.py)
    with pytest.raises(ValueError, match="unknown init"):
        build_model("mlp30", init="xavier")


def test_net_a_has_a_zero_softmax_layer_and_one_sigmoid_layer():
    torch.manual_seed(0)
    model = build_model("net_a")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 784), (10, 100)]
    assert not linears[-1].weight.any() and not linears[-1].bias.any()
    assert linears[0].weight.std().item() == pytest.approx(784**-0.5, rel=0.05)


def test_maxout_takes_the_max_of_each_group_of_pieces():
    x = torch.tensor([[1.0, 5.0, -2.0, -1.0, 3.0, 3.5]])  # 3 units of 2 pieces
    assert Maxout(2)(x).tolist() == [[5.0, -1.0, 3.5]]
    conv = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3) % 7
    want = torch.stack([conv[:, 0:2].amax(1), conv[:, 2:4].amax(1)], dim=1)
    assert torch.equal(Maxout(2)(conv), want)
    with pytest.raises(ValueError, match="at least 2 pieces"):
        Maxout(1)
    model = build_model("net_d_maxout", pieces=3)
    assert model.features[0].out_channels == 60 and model.classifier[1].out_features == 300


def test_factories_pickle_and_build_what_build_model_builds():
    factory = pickle.loads(pickle.dumps(RegistryFactory("net_d", input_shape=(3, 16, 16), num_classes=4)))
    torch.manual_seed(3)
    a = factory()
    torch.manual_seed(3)
    b = build_model("net_d", input_shape=(3, 16, 16), num_classes=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    imported = pickle.loads(pickle.dumps(ImportedFactory("models.conv:net_b")))
    assert isinstance(imported(), torch.nn.Module)


def test_import_factory_errors_say_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "usernets.py").write_text("VALUE = 3\n\ndef not_a_model():\n    return 'nope'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, needle in [("usernets", "not of the form package.module:function"),
                         ("nosuchmodule:f", "cannot import 'nosuchmodule'"),
                         ("usernets:missing", "module 'usernets' has no attribute 'missing'"),
                         ("usernets:VALUE", "usernets:VALUE is a int, not a function")]:
        with pytest.raises(ValueError, match=needle):
            import_factory(spec)
    with pytest.raises(TypeError, match="returned a str, not a torch.nn.Module"):
        ImportedFactory("usernets:not_a_model")()
