"""What is outside the path model is a clear error naming every offending node (MATH.md section 1)."""
import pytest
import torch
from torch import nn

import pathmonitor as pm


class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


class ConstantBias(nn.Module):
    def forward(self, x):
        return x + 1.0


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(x) + self.fc(y)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


CASES = [
    (nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), (4,), "1", "GELU"),
    (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU()), (4,), "1", "LeakyReLU"),
    (nn.Sequential(nn.Linear(4, 4), nn.PReLU()), (4,), "1", "PReLU"),
    (nn.Sequential(nn.Linear(4, 4), nn.Hardtanh()), (4,), "1", "Hardtanh"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), "1", "LayerNorm"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)), (1, 5, 5), "1", "GroupNorm"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)), (4,), "1", "Softmax"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (1, 5, 5), "1", "BatchNorm2d"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2, mode="bicubic")), (1, 5, 5), "1", "Upsample"),
    (Attention(), (3, 4), "attn", "MultiheadAttention"),
]


@pytest.mark.parametrize("model, shape, name, kind", CASES, ids=[c[3] for c in CASES])
def test_unsupported_module_is_named(model, shape, name, kind):
    report = pm.check_support(model, shape)
    assert [(p.name, p.kind) for p in report] == [(name, kind)]
    with pytest.raises(pm.UnsupportedModelError, match=rf"{name} \({kind}\)"):
        pm.path_norm(model, shape)
    with pytest.raises(pm.UnsupportedModelError):
        pm.log_path_norm(model, shape)


def test_functional_problems_name_the_enclosing_module_and_all_are_reported():
    model = nn.Sequential(Product(), ConstantBias(), nn.Tanh())
    report = pm.check_support(model, (4,))
    described = [str(p) for p in report]
    assert any("0 (Product)" in d and "sigmoid" in d for d in described)
    assert any("0 (Product)" in d and "multiplies two activations" in d for d in described)
    assert any("1 (ConstantBias)" in d and "bias without a parameter" in d for d in described)
    assert any(d.startswith("2 (Tanh)") for d in described)
    assert len(report) == 4


def test_two_inputs_and_data_dependent_control_flow():
    assert "more than one input" in str(pm.check_support(TwoInputs(), (4,)))
    with pytest.raises(pm.UnsupportedModelError, match="could not be traced"):
        pm.path_norm(DataDependent(), (4,))


def test_wrong_input_shape_names_the_failing_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert not pm.check_support(model, (3, 8, 8))
    report = pm.check_support(model, (3, 9, 9))
    assert len(report) == 1 and "2 (Linear)" in str(report)
    with pytest.raises(pm.PathComputationError, match=r"2 \(Linear\).*input_shape \(3, 9, 9\)"):
        pm.path_norm(model, (3, 9, 9))


def test_the_shape_check_runs_once_per_graph_and_again_when_a_tensor_changes_shape(monkeypatch):
    from pathmonitor import norms

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    dry_runs = []
    evaluate = norms.evaluate
    monkeypatch.setattr(norms, "evaluate", lambda *args, **kwargs: dry_runs.append(1) or evaluate(*args, **kwargs))
    assert not pm.check_support(model, (3, 8, 8)) and not pm.check_support(model, (3, 8, 8))
    assert len(dry_runs) == 1  # several monitors of one model
    with torch.no_grad():
        model[2].weight = nn.Parameter(torch.ones(2, 4 * 5 * 5))  # the structure is the same, a shape is not
    report = pm.check_support(model, (3, 8, 8))
    assert len(dry_runs) == 2 and len(report) == 1 and "2 (Linear)" in str(report)


@pytest.mark.parametrize("bad", [(), (3, 0, 4), "abc", 5, (2.5, 3)])
def test_bad_input_shape_and_q(bad):
    with pytest.raises(ValueError, match="input_shape"):
        pm.path_norm(nn.Linear(3, 2), bad)


@pytest.mark.parametrize("q", [0.5, 0, float("inf"), "2"])
def test_bad_q(q):
    with pytest.raises(ValueError, match="q must be"):
        pm.path_norm(nn.Linear(3, 2), (3,), q=q)


def test_capture_is_cached_and_invalidated_when_structure_changes():
    from pathmonitor.graph import capture

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    original_relu = model[1]  # held, so that a new module cannot reuse its id
    first = capture(model, (4,))
    assert capture(model, (4,)) is first
    model[1] = nn.GELU()
    with pytest.raises(pm.UnsupportedModelError, match="GELU"):
        pm.path_norm(model, (4,))
    model[1] = nn.ReLU()
    assert capture(model, (4,)) is not first
    model[1] = original_relu
    assert capture(model, (4,)) is not first
    assert float(pm.path_norm(model, (4,)).detach()) > 0


def test_data_parallel_wrapper_is_unwrapped_and_non_modules_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pm.path_norm(lambda x: x, (3,))


def test_a_batch_norm_fed_the_wrong_number_of_channels_is_refused_up_front():
    """Also where broadcasting one input channel against the layer's channels would go through."""
    model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    report = pm.check_support(model, (3, 8, 8))
    assert len(report) == 1 and "1 (BatchNorm2d)" in str(report) and "4 channels" in str(report)
