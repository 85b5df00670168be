"""Model parallelism without actors (ray_train/worker/stages.py): a network cut into stages
computes what it computed, the cut is balanced by parameter count, the schedules are what GPipe
and 1F1B are, and S stages x M micro-batches give one process's SGD on the whole batch."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from ray_train.worker.stages import SplitError, balanced_cuts, bubble, in_flight, layers, run_schedule, schedule, split


def _fc(width=64, n_in=20, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def test_registry_networks_are_lines_of_layers_and_split_into_what_they_compute():
    x = torch.rand(4, 1, 28, 28)
    for name in ("mlp30", "net_b", "net_d"):
        torch.manual_seed(0)
        net = build_model(name)
        names = [n for n, _ in layers(net)]
        assert len(names) >= 4 and len(set(names)) == len(names), names
        for stages in (2, 3):
            parts = split(net, stages, example=x)  # raises unless the parts compute what the network does
            assert len(parts) == stages and all(len(p) for p in parts)
            assert sum(p.numel() for part in parts for p in part.parameters()) == sum(p.numel() for p in net.parameters())


def test_the_cut_is_balanced_by_parameter_count():
    assert balanced_cuts([10, 10, 10, 10], 2) == [0, 2]
    assert balanced_cuts([100, 1, 1, 1, 100], 2) == [0, 2]  # 101 | 102 rather than 100 | 103
    assert balanced_cuts([5, 0, 0, 5], 4) == [0, 1, 2, 3]
    net = _fc()
    first, second = split(net, 2)
    a, b = (sum(p.numel() for p in part.parameters()) for part in (first, second))
    assert abs(a - b) <= max(p.numel() for p in net.parameters())


def test_bad_cuts_are_clear_errors():
    net = _fc()
    with pytest.raises(SplitError, match="only 7 layers"):
        split(net, 8)
    with pytest.raises(SplitError, match="'9' is not a layer of the network; its layers: 0, 1, 2"):
        split(net, 2, split_at=["9"])
    with pytest.raises(SplitError, match="make 2 stages, not --stages 3"):
        split(net, 3, split_at=["4"])
    assert [len(p) for p in split(net, 2, split_at=["4"])] == [4, 3]

    class Skip(nn.Module):  # a residual network does not run its layers in a line
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.b(self.a(x)) + x

    with pytest.raises(SplitError, match="cannot be cut automatically"):
        split(Skip(), 2, example=torch.rand(3, 4))


@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 4), (4, 8), (3, 2)])
def test_the_schedules(stages, micro):
    for kind in ("gpipe", "1f1b"):
        plan = schedule(kind, stages, micro)
        for s, acts in enumerate(plan):
            assert sorted(acts) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
            assert all(acts.index(("F", m)) < acts.index(("B", m)) for m in range(micro))
            assert [m for k, m in acts if k == "B"] == list(range(micro))  # the same accumulation order
            want = micro if kind == "gpipe" else min(micro, stages - s)
            assert in_flight(acts) == want, (kind, s, acts)
    assert bubble(2, 8) == pytest.approx(1 / 9)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stages_times_micro_batches_equal_one_process_on_the_whole_batch(stages, kind, momentum):
    torch.manual_seed(1)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    ref, piped = _fc(), _fc()
    parts = split(piped, stages)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum)
    opt = torch.optim.SGD(piped.parameters(), lr=0.1, momentum=momentum)
    for step in range(50):
        xb, yb = x[(step % 8) * 32:(step % 8 + 1) * 32], y[(step % 8) * 32:(step % 8 + 1) * 32]
        opt_ref.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        opt_ref.step()
        opt.zero_grad()
        result = run_schedule(parts, xb, yb, F.cross_entropy, micro=4, kind=kind)
        opt.step()
        assert result.peak == [4 if kind == "gpipe" else min(4, stages - s) for s in range(stages)]
    diff = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), piped.parameters()))
    assert diff < 1e-5, diff  # not to the bit: micro-batch gradients are summed in another order


def test_a_micro_batch_count_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(SplitError, match="--micro-batches: 3 does not divide the batch of 32"):
        run_schedule(split(_fc(), 2), torch.randn(32, 20), torch.randint(0, 5, (32,)), F.cross_entropy, micro=3)


def test_the_schedules_give_the_same_gradients_to_the_bit():
    torch.manual_seed(2)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    nets = [_fc(), copy.deepcopy(_fc())]
    for net, kind in zip(nets, ("gpipe", "1f1b")):
        run_schedule(split(net, 4), x, y, F.cross_entropy, micro=8, kind=kind)
    for a, b in zip(*(n.parameters() for n in nets)):
        assert torch.equal(a.grad, b.grad)


class _TwoBlocks(nn.Module):
    """Children all nn.Sequential, but forward is not them in a line: one piece only as a stage."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Linear(20, 8)), nn.Sequential(nn.Linear(20, 8))

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_list_of_stage_modules_is_cut_at_its_boundaries():
    from models.staged import Stages, whole_network

    torch.manual_seed(0)
    net = whole_network([_TwoBlocks(), nn.Sequential(nn.ReLU(), nn.Linear(8, 5))])
    assert isinstance(net, Stages) and [n for n, _ in layers(net)] == ["0", "1"]
    x = torch.rand(4, 20)
    first, second = split(net, 2, example=x)  # each module whole: the check passes
    assert torch.allclose(second(first(x)), net(x))
    assert nn.Sequential(*[_TwoBlocks(), nn.Sequential(nn.ReLU(), nn.Linear(8, 5))]).load_state_dict(net.state_dict()).missing_keys == []
    assert whole_network(net) is net and whole_network([]) == []
