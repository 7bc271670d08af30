"""Capture that knows the input shape, and supported layers whose forward is their own code
(MATH.md section 1)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pathmonitor as pm
from zoo import l1_path_norm_by_surgery


class ShapeBranches(nn.Module):
    """Asks for the input's shape the ways real model code does, and branches on the answers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        assert x.dim() == 4 and x.ndim == 4 and len(x) == 1 and x.numel() == x.shape.numel()
        x = F.relu(self.bn(self.conv(x)))
        if x.shape[-1] > 4:  # taken at 8x8, not at 4x4: both end at 8x8 below
            x = F.max_pool2d(x, 2)
        x = F.interpolate(x, size=(x.size(2) * 2, x.size(-1) * 2), mode="bilinear")
        return self.head(x.reshape(x.size(0), -1))


def _randomized(model):
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, -2, 2)
            nn.init.uniform_(module.bias, -1, 1)
    return model.eval()


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 4, 4)])
def test_shape_questions_are_answered_and_the_branch_taken_is_captured(shape):
    model = _randomized(ShapeBranches())
    with torch.no_grad():
        assert float(pm.path_norm(model, shape)) == pytest.approx(l1_path_norm_by_surgery(model, shape), rel=1e-9)


class BatchNormAct(nn.BatchNorm2d):
    """A batch-norm with its activation, written out functionally as timm's BatchNormAct2d is."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class SamePadConv(nn.Conv2d):
    """Pads asymmetrically itself, then convolves without padding."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class LinearHead(nn.Linear):
    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


def _overriding():
    return _randomized(nn.Sequential(SamePadConv(3, 4, 2, stride=2), BatchNormAct(4), LinearHead(4 * 4 * 4, 2)))


def _plain_twin(model):
    """The same maps written with plain layers, sharing the parameters and statistics."""
    conv, norm, head = model
    twin = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    twin[1].load_state_dict(conv.state_dict())
    twin[2].load_state_dict(norm.state_dict())
    twin[5].load_state_dict(head.state_dict())
    return twin.eval()


@pytest.mark.parametrize("q", [1, 2, 3])
def test_layers_with_their_own_forward_are_traced_into_and_equal_plain_layers(q):
    model = _overriding()
    with torch.no_grad():
        value = float(pm.path_norm(model, (3, 7, 7), q))
        assert value == pytest.approx(float(pm.path_norm(_plain_twin(model), (3, 7, 7), q)), rel=1e-12)
        if q == 1:
            assert value == pytest.approx(l1_path_norm_by_surgery(model, (3, 7, 7)), rel=1e-9)
        model = model.double()
        rescaled = pm.random_rescale(model, generator=torch.Generator().manual_seed(0), input_shape=(3, 7, 7))
        assert not torch.equal(rescaled[0].weight, model[0].weight)  # the convolution is rescaled, the BN compensates
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
        assert torch.allclose(rescaled(x), model(x), rtol=1e-9, atol=1e-12)
        assert float(pm.path_norm(rescaled, (3, 7, 7), q)) == pytest.approx(float(pm.path_norm(model, (3, 7, 7), q)),
                                                                             rel=1e-9)


class StandardizedConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight - self.weight.mean(), self.bias)


class BatchStatistics(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)


class OtherEps(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 0.5)


class ForgetsBias(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight)


class BorrowedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return F.conv2d(x, self.a.weight, self.b.bias)


@pytest.mark.parametrize("layer, kind, reason", [
    (StandardizedConv(3, 2, 3), "torch.conv2d", "weight standardization"),
    (BatchStatistics(3), "F.batch_norm", "batch statistics"),
    (OtherEps(3), "F.batch_norm", "eps=0.5"),
    (ForgetsBias(3, 2, 3), "torch.conv2d", "leaves out"),
    (BorrowedBias(), "torch.conv2d", "one Conv2d layer"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_functional_calls_outside_the_layer_map_are_refused_with_the_reason(layer, kind, reason):
    report = pm.check_support(nn.Sequential(layer), (3, 6, 6))
    assert [(p.name, p.kind) for p in report] == [(f"0 ({type(layer).__name__})", kind)]
    assert reason in report[0].reason


class JitGuarded(nn.Module):
    """Concatenates a skip only when TorchScript's isinstance says it is a tensor, as MONAI does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.out = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        assert x.shape[1] == 3
        skip = x
        x = self.conv(x)
        if torch.jit.isinstance(skip, torch.Tensor):
            x = torch.cat([x, skip], dim=1)
        return self.out(x)


def test_torchscript_isinstance_sees_traced_tensors_and_is_restored():
    checking = torch.jit.isinstance
    model = JitGuarded().eval()
    with torch.no_grad():
        assert float(pm.path_norm(model, (3, 4, 4))) == pytest.approx(l1_path_norm_by_surgery(model, (3, 4, 4)),
                                                                     rel=1e-9)
    assert torch.jit.isinstance is checking
    with pytest.raises(pm.UnsupportedModelError):
        pm.path_norm(JitGuarded(), (5, 4, 4))
    assert torch.jit.isinstance is checking


def test_an_input_shape_the_model_refuses_is_named_as_such():
    with pytest.raises(pm.UnsupportedModelError, match=r"(?s)input_shape \(3, 4, 4\).*does not fit"):
        pm.path_norm(ShapeBranchesStrict(), (3, 4, 4))


class ShapeBranchesStrict(ShapeBranches):
    def forward(self, x):
        assert x.shape[-1] == 8, "expects 8x8 inputs"
        return super().forward(x)


def test_shape_dependent_models_are_rescaled_given_the_input_shape():
    with pytest.raises(pm.UnsupportedModelError, match="input_shape"):
        pm.random_rescale(ShapeBranches())
    model = _randomized(ShapeBranches()).double()
    rescaled = pm.random_rescale(model, generator=torch.Generator().manual_seed(0), input_shape=(3, 8, 8))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(rescaled(x), model(x), rtol=1e-9, atol=1e-12)


class CachesPerShape(nn.Module):
    """Caches a table per input shape, as positional encodings do: the cache is filled while tracing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.cached_shape, self.table = None, None

    def forward(self, x):
        y = self.conv(x)
        if self.cached_shape != y.shape:
            self.cached_shape, self.table = y.shape, torch.zeros(y.shape[1:], device=y.device)
        return y + self.table


def test_the_model_is_left_untouched_by_forward_code_run_while_tracing():
    model = nn.Sequential(CachesPerShape()).eval()
    with pytest.raises(pm.UnsupportedModelError, match="bias without a parameter"):
        pm.path_norm(model, (3, 8, 8))
    assert model[0].table is None and model[0].cached_shape is None
    assert isinstance(model(torch.randn(1, 3, 8, 8)), torch.Tensor)


class RegroupingConv(nn.Conv2d):
    """Applies its grouped weight as one group: the call, not the layer, decides the channel layout."""

    def forward(self, x):
        return F.conv2d(x[:, :2], self.weight, self.bias, 1, 1)


def test_rescaling_skips_functional_calls_that_lay_out_channels_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), RegroupingConv(4, 4, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(4, 1, 1)).double().eval()
    rescaled = pm.random_rescale(model, generator=torch.Generator().manual_seed(1), input_shape=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(rescaled(x), model(x), rtol=1e-9, atol=1e-12)


def test_parametrized_layers_keep_shapes_known():
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3, padding=1))
    model = nn.Sequential(conv, nn.ReLU(), ShapeBranches()).eval()
    plain = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        plain.bias.copy_(conv.bias)
        twin = nn.Sequential(plain, nn.ReLU(), model[2])
        assert float(pm.path_norm(model, (3, 8, 8))) == pytest.approx(float(pm.path_norm(twin, (3, 8, 8))), rel=1e-12)


class LoopsOverParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(2))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, x.split(2, 1))], 1)


def test_loops_over_the_parts_of_a_split():
    model = LoopsOverParts().eval()
    with torch.no_grad():
        assert float(pm.path_norm(model, (4, 5, 5))) == pytest.approx(l1_path_norm_by_surgery(model, (4, 5, 5)),
                                                                     rel=1e-9)


def _as_empty_partitions(model):
    """Every parameter an empty tensor that remembers its full shape, as a ZeRO-3 rank holds it."""
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            empty = nn.Parameter(torch.empty(0, dtype=p.dtype))
            empty.ds_id, empty.ds_shape = id(p), p.shape
            module._parameters[key] = empty
    return model


def test_shapes_are_known_through_layers_whose_parameters_are_empty_partitions():
    from pathmonitor.graph import capture

    whole = capture(_randomized(ShapeBranches()), (3, 8, 8))
    sharded = capture(_as_empty_partitions(_randomized(ShapeBranches())), (3, 8, 8))
    described = [[(op.kind, op.target, op.label) for op in graph.ops] for graph in (whole, sharded)]
    assert described[0] == described[1]
    assert any(type(op.pool).__name__ == "WindowPool" for op in sharded.ops)  # the branch an 8x8 input takes


class RegistersOnFirstCall(nn.Module):
    """Registers a buffer and builds its head on the first forward, as lazily built models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if not hasattr(self, "order"):
            self.register_buffer("order", torch.arange(x.shape[1]).flip(0))
            self.head = nn.Linear(x.shape[1] * 4 * 4, 2)
        return self.head(self.conv(x[:, self.order]).flatten(1))


def test_what_forward_registers_on_its_first_call_stays_for_the_graph():
    torch.manual_seed(0)
    model = RegistersOnFirstCall().eval()
    with torch.no_grad():
        value = float(pm.path_norm(model, (3, 6, 6)))
        assert value == pytest.approx(l1_path_norm_by_surgery(model, (3, 6, 6)), rel=1e-9)
    assert torch.equal(model.order, torch.tensor([2, 1, 0])) and isinstance(model.head, nn.Linear)


def test_a_pruned_model_is_traced_once_however_many_forwards_run():
    from pathmonitor.graph import capture

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    first = capture(model, (3, 6, 6))
    model(torch.randn(1, 3, 6, 6))  # recomputes the pruned weight
    assert capture(model, (3, 6, 6)) is first
