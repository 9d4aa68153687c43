"""`apq import-supernet`: the APQ reference's once-for-all supernet as an apq_imagenet weights file.

The reference code is not a dependency, so these tests build a file in its format themselves
(random weights at the real shapes, non-identity kernel transformation matrices, random
BatchNorm statistics with small variances so that eps matters) and check the import against
:func:`reference_forward`, an independent re-statement of the reference network's forward
(``DynamicQuantizedProxylessNASNets`` with quantization off): its tensor names, its channel
slicing, its kernel transformation ``F.linear(centre, M)``, BatchNorm at eps 1e-3 and its width
rule ``make_divisible(round(in · e), 8)``. Nothing here imports the importer's name mapping.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apq_lightning.apq_reference import REFERENCE_BN, import_reference_supernet
from apq_lightning.cli import main
from apq_lightning.final.pipeline import supernet_space
from apq_lightning.modules.common import load_checked_supernet
from apq_lightning.space import Subnet, get_space
from apq_lightning.supernet import bn_param
from apq_lightning.supernet_io import WEIGHTS_FORMAT, export_supernet_weights, load_supernet

SPACE = get_space("apq_imagenet")
STAGES = ((24, 2, 4), (40, 2, 4), (80, 2, 4), (96, 1, 4), (192, 2, 4), (320, 1, 1))
"""(out channels, stride, blocks) of the reference's six elastic stages."""


# --------------------------------------------------------------------------------------
# A file in the reference's format, and the reference network's forward
# --------------------------------------------------------------------------------------
def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """582 tensors named as the reference's quantized supernet names them (dynamic layers
    doubled: ``…conv.conv.weight``, ``…bn.bn.*``), its quantization ranges included."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, *shape: int) -> None:
        fan_in = math.prod(shape[1:])
        sd[name + ".weight"] = torch.randn(*shape, generator=g) * math.sqrt(2.0 / fan_in)

    def ranges(name: str) -> None:
        sd[name + ".activation_range"], sd[name + ".weight_range"] = torch.tensor([6.0]), torch.tensor([-1.0])

    def bn(name: str, c: int) -> None:
        sd[name + ".weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = 0.002 + torch.rand(c, generator=g) * 0.05  # small: eps 1e-3 vs 1e-5 shows
        sd[name + ".num_batches_tracked"] = torch.tensor(12345)

    conv("first_conv.conv", 32, 3, 3, 3), ranges("first_conv.conv"), bn("first_conv.bn", 32)
    p = "blocks.0.mobile_inverted_conv"
    conv(f"{p}.depth_conv.conv", 32, 1, 3, 3), ranges(f"{p}.depth_conv.conv"), bn(f"{p}.depth_conv.bn", 32)
    conv(f"{p}.point_linear.conv", 16, 32, 1, 1), ranges(f"{p}.point_linear.conv"), bn(f"{p}.point_linear.bn", 16)
    cin, index = 16, 1
    for cout, _, blocks in STAGES:
        for _ in range(blocks):
            mid, p = 6 * cin, f"blocks.{index}.mobile_inverted_conv"
            conv(f"{p}.inverted_bottleneck.conv.conv", mid, cin, 1, 1), ranges(f"{p}.inverted_bottleneck.conv")
            bn(f"{p}.inverted_bottleneck.bn.bn", mid)
            conv(f"{p}.depth_conv.conv.conv", mid, 1, 7, 7), ranges(f"{p}.depth_conv.conv")
            for big, small in ((7, 5), (5, 3)):
                sd[f"{p}.depth_conv.conv.{big}to{small}_matrix"] = (
                    torch.eye(small * small) + 0.15 * torch.randn(small * small, small * small, generator=g))
            bn(f"{p}.depth_conv.bn.bn", mid)
            conv(f"{p}.point_linear.conv.conv", cout, mid, 1, 1), ranges(f"{p}.point_linear.conv")
            bn(f"{p}.point_linear.bn.bn", cout)
            cin, index = cout, index + 1
    conv("feature_mix_layer.conv", 1280, 320, 1, 1), ranges("feature_mix_layer.conv"), bn("feature_mix_layer.bn", 1280)
    sd["classifier.linear.weight"] = torch.randn(1000, 1280, generator=g) * 0.03
    sd["classifier.linear.bias"] = 0.1 * torch.randn(1000, generator=g)
    ranges("classifier.linear")
    return sd


def respelled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The other spelling the reference's loader accepts: dynamic layers single
    (``…conv.weight``, ``…bn.*``), fixed ones doubled (``…bn.bn.*``, ``…linear.linear.*``); no
    quantization ranges (as a float once-for-all file has none)."""
    out = {}
    for key, value in sd.items():
        if key.endswith(("activation_range", "weight_range")):
            continue
        if ".bn.bn." in key or ".conv.conv." in key:
            key = key.replace(".bn.bn.", ".bn.").replace(".conv.conv.", ".conv.")
        elif ".bn." in key:
            key = key.replace(".bn.", ".bn.bn.")
        elif key.startswith("classifier.linear."):
            key = key.replace("classifier.linear.", "classifier.linear.linear.")
        out[key] = value
    return out


def network_channels(value: float) -> int:
    """The reference network's ``make_divisible(round(value), 8)``."""
    v = round(value)
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


def reference_forward(sd: dict[str, torch.Tensor], spec: dict, x: torch.Tensor) -> torch.Tensor:
    """The reference network's logits for APQ spec ``spec`` (float; names as :func:`reference_state_dict`)."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        c = t.shape[1]
        return F.batch_norm(t, sd[name + ".running_mean"][:c], sd[name + ".running_var"][:c],
                            sd[name + ".weight"][:c], sd[name + ".bias"][:c], False, 0.0, 1e-3)

    def active_filter(p: str, mid: int, k: int) -> torch.Tensor:
        w, size = sd[f"{p}.depth_conv.conv.conv.weight"][:mid], 7
        while size > k:  # centre of the current kernel, through the next matrix as F.linear applies it
            small, start = size - 2, 1
            centre = w[:, :, start:start + small, start:start + small].reshape(mid, small * small)
            w = F.linear(centre, sd[f"{p}.depth_conv.conv.{size}to{small}_matrix"]).reshape(mid, 1, small, small)
            size = small
        return w

    x = F.relu6(bn(F.conv2d(x, sd["first_conv.conv.weight"], stride=2, padding=1), "first_conv.bn"))
    p = "blocks.0.mobile_inverted_conv"
    x = F.relu6(bn(F.conv2d(x, sd[f"{p}.depth_conv.conv.weight"], padding=1, groups=32), f"{p}.depth_conv.bn"))
    x = bn(F.conv2d(x, sd[f"{p}.point_linear.conv.weight"]), f"{p}.point_linear.bn")
    first = 0
    for stage, (cout, stride, blocks) in enumerate(STAGES):
        depth = min(blocks, spec["d"][stage])  # the last stage's single block always runs
        for j in range(depth):
            b, s = first + j, (stride if j == 0 else 1)
            cin, k = x.shape[1], spec["ks"][b]
            mid, p = network_channels(cin * spec["e"][b]), f"blocks.{b + 1}.mobile_inverted_conv"
            y = F.conv2d(x, sd[f"{p}.inverted_bottleneck.conv.conv.weight"][:mid, :cin])
            y = F.relu6(bn(y, f"{p}.inverted_bottleneck.bn.bn"))
            y = F.conv2d(y, active_filter(p, mid, k), stride=s, padding=k // 2, groups=mid)
            y = F.relu6(bn(y, f"{p}.depth_conv.bn.bn"))
            y = bn(F.conv2d(y, sd[f"{p}.point_linear.conv.conv.weight"][:cout, :mid]), f"{p}.point_linear.bn.bn")
            x = x + y if s == 1 and cin == cout else y
        first += blocks
    x = F.relu6(bn(F.conv2d(x, sd["feature_mix_layer.conv.weight"]), "feature_mix_layer.bn"))
    return F.linear(x.mean(3).mean(2), sd["classifier.linear.weight"], sd["classifier.linear.bias"])


def apq_specs() -> list[dict]:
    """APQ specs as the reference writes them: the extremes, random float ratios (its sampler's
    ``4 + 2·U``), and one whose block 0 (in = 16, e = 5.741) the two rounding rules disagree on."""
    g = torch.Generator().manual_seed(3)
    specs = [{"wid": None, "ks": [7] * 21, "e": [6] * 21, "d": [4] * 6},
             {"wid": None, "ks": [3] * 21, "e": [4] * 21, "d": [2] * 6}]
    for _ in range(3):
        specs.append({"wid": None, "ks": [[3, 5, 7][i] for i in torch.randint(0, 3, (21,), generator=g).tolist()],
                      "e": (4 + 2 * torch.rand(21, generator=g, dtype=torch.float64)).tolist(),
                      "d": torch.randint(2, 5, (6,), generator=g).tolist()})
    between = {"wid": None, "ks": [5, 3, 7] * 7, "e": [5.741] + [4.9] * 20, "d": [4, 3, 2, 4, 3, 1]}
    return [*specs, between]


# --------------------------------------------------------------------------------------
# Fixtures: one reference file of each spelling, imported once
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return reference_state_dict()


@pytest.fixture(scope="module", params=["reference", "respelled"])
def imported(request, reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    sd = reference if request.param == "reference" else respelled(reference)
    torch.save({"state_dict": sd, "epoch": 0}, tmp / "imagenet-OFA")
    summary = import_reference_supernet(tmp / "imagenet-OFA", tmp / "ofa.pt")
    return summary, tmp / "ofa.pt", len(sd)


def test_the_test_file_has_the_reference_layout(reference):
    """582 tensors, 136 of them quantization ranges (the issue's count), 446 of ours."""
    ranges = [k for k in reference if k.endswith(("activation_range", "weight_range"))]
    assert len(reference) == 582 and len(ranges) == 136
    from apq_lightning.supernet import Supernet

    assert len(Supernet("apq_imagenet", 1000).state_dict()) == 446 == len(respelled(reference))


# --------------------------------------------------------------------------------------
# The imported file computes the reference network's function
# --------------------------------------------------------------------------------------
def test_import_writes_a_plain_weights_file(imported):
    summary, out, n = imported
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == WEIGHTS_FORMAT and raw["space"] == "apq_imagenet" and raw["num_classes"] == 1000
    assert raw["batchnorm"] == REFERENCE_BN == {"eps": 1e-3, "momentum": 0.1}
    assert raw["imported_from"]["file"] == "imagenet-OFA" and len(raw["imported_from"]["sha256"]) == 64
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    assert summary.tensors == 446 and summary.ignored == n - 446
    assert supernet_space(out) == ("apq_imagenet", 1000)  # `apq final --supernet` takes it
    net = load_checked_supernet(str(out), "apq_imagenet", 1000)  # what every recipe's supernet_ckpt goes through
    assert {(m.eps, m.momentum) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-3, 0.1)}


def test_tensors_land_where_the_format_says(imported, reference):
    net = load_supernet(str(imported[1]))
    state = net.state_dict()
    assert torch.equal(state["stem.conv.weight"], reference["first_conv.conv.weight"])
    first = "blocks.0.mobile_inverted_conv"  # the reference's fixed first block
    assert torch.equal(state["first.project.bn.running_var"], reference[f"{first}.point_linear.bn.running_var"])
    assert torch.equal(state["head.bn.bias"], reference["feature_mix_layer.bn.bias"])
    assert torch.equal(state["classifier.weight"], reference["classifier.linear.weight"])
    for i in (0, 7, 20):  # our block i is the reference's block i + 1
        p = f"blocks.{i + 1}.mobile_inverted_conv"
        expand = reference[f"{p}.inverted_bottleneck.conv.conv.weight"]
        assert torch.equal(state[f"blocks.{i}.expand_conv.weight"], expand)
        assert torch.equal(state[f"blocks.{i}.dw_bn.running_mean"], reference[f"{p}.depth_conv.bn.bn.running_mean"])
        assert torch.equal(state[f"blocks.{i}.project_conv.weight"], reference[f"{p}.point_linear.conv.conv.weight"])
        matrix = reference[f"{p}.depth_conv.conv.7to5_matrix"]
        assert not torch.allclose(matrix, matrix.T)  # so a missing transposition cannot pass
        assert torch.equal(state[f"blocks.{i}.dw_conv.transforms.7to5"], matrix.T)
    assert int(state["blocks.3.project_bn.num_batches_tracked"]) == 12345


@pytest.mark.parametrize("spec_index", range(6))
def test_extracted_specs_compute_the_reference_network(imported, reference, spec_index):
    spec = apq_specs()[spec_index]
    net = load_supernet(str(imported[1])).eval()
    subnet = Subnet.from_apq(spec)
    model = net.extract(subnet).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(spec_index))
    with torch.no_grad():
        want = reference_forward(reference, spec, x)
        got = model(x)
        with net.activated(subnet):
            inside = net(x)
    tol = 2e-5 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    assert (inside - want).abs().max().item() <= tol  # running inside the supernet too
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}


def test_one_full_size_image(imported, reference):
    """At 224 px, the size the reference runs at (one image, the largest subnet)."""
    spec = apq_specs()[0]
    model = load_supernet(str(imported[1])).extract(Subnet.from_apq(spec)).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference_forward(reference, spec, x), model(x)
    assert got.shape == (1, 1000) and (got - want).abs().max().item() <= 2e-5 * want.abs().max().item()


def test_the_checks_can_fail(imported, reference):
    """The comparison sees BatchNorm's eps and the rounding rule: torch's eps, or the cost rounding
    on the spec that falls between the two rules, give other logits."""
    spec = apq_specs()[-1]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net = load_supernet(str(imported[1])).eval()
    with torch.no_grad():
        want = reference_forward(reference, spec, x)
        wrong_eps = net.extract(Subnet.from_apq(spec))
        for m in wrong_eps.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 1e-5
        wrong_width = net.extract(Subnet.from_apq(spec, rounding="cost")).eval()
        for model in (wrong_eps.eval(), wrong_width):
            assert (model(x) - want).abs().max().item() > 1e-3 * want.abs().max().item()


# --------------------------------------------------------------------------------------
# The width rule of an APQ spec
# --------------------------------------------------------------------------------------
def test_a_spec_between_the_rules_gets_the_network_channels(imported):
    spec = apq_specs()[-1]
    assert network_channels(16 * 5.741) == 96  # the reference network; its converter prices 88
    assert Subnet.from_apq(spec).widths[0] == 96
    assert Subnet.from_dict(spec).widths[0] == 96  # every entry point that parses APQ specs
    assert Subnet.from_apq(spec, rounding="cost").widths[0] == 88  # APQ's own latency rounding, on request
    model = load_supernet(str(imported[1])).extract(Subnet.from_apq(spec))
    assert model.blocks[0].expand.conv.out_channels == 96


def test_rules_agree_on_every_width_of_the_space():
    """Specs written from widths of the space (to_apq, the converter's ratios) mean the same under
    both rules: the BitFusion reference sums keep their meaning."""
    for block in SPACE.blocks:
        for width in block.width_choices:
            spec = {"ks": [3] * 21, "e": [4] * 21, "d": [4] * 6}
            spec["e"][block.index] = width / block.in_channels
            a, b = Subnet.from_apq(spec), Subnet.from_apq(spec, rounding="cost")
            assert a == b and a.widths[block.index] == width


# --------------------------------------------------------------------------------------
# Other files, through the command
# --------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this creates a file: proof that a loader ran pickled code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_file(tmp, kind: str, reference: dict[str, torch.Tensor]):
    path = tmp / f"{kind}.pt"
    sd = dict(reference)
    if kind == "truncated":
        torch.save({"state_dict": sd}, path)
        path.write_bytes(path.read_bytes()[: 2**20])
    elif kind == "pickled-code":
        torch.save({"state_dict": sd, "x": Exploit(tmp / "EXPLOITED")}, path)
    elif kind == "wrong-shape":
        sd["blocks.5.mobile_inverted_conv.depth_conv.conv.conv.weight"] = torch.zeros(144, 1, 5, 5)
        torch.save({"state_dict": sd}, path)
    elif kind == "foreign-tensor":
        sd["blocks.22.mobile_inverted_conv.depth_conv.conv.conv.weight"] = torch.zeros(8, 1, 7, 7)
        torch.save({"state_dict": sd}, path)
    elif kind == "missing":
        del sd["blocks.9.mobile_inverted_conv.point_linear.bn.bn.running_var"]
        torch.save({"state_dict": sd}, path)
    elif kind == "twice":
        sd["blocks.9.mobile_inverted_conv.point_linear.bn.running_var"] = sd[
            "blocks.9.mobile_inverted_conv.point_linear.bn.bn.running_var"]
        torch.save({"state_dict": sd}, path)
    elif kind == "cifar-weights":
        import shutil
        from pathlib import Path

        shutil.copy(Path(__file__).resolve().parents[1] / "weights" / "apq_cifar_supernet.pt", path)
    elif kind == "not-a-state-dict":
        torch.save({"epoch": 3, "hello": "world"}, path)
    return path


BAD = {
    "truncated": "cannot be read (truncated",
    "pickled-code": "refused",
    "wrong-shape": "tensor 'blocks.5.mobile_inverted_conv.depth_conv.conv.conv.weight' is floating of shape "
                   "(144, 1, 5, 5); an apq_imagenet supernet needs floating of shape (144, 1, 7, 7)",
    "foreign-tensor": "tensor 'blocks.22.mobile_inverted_conv.depth_conv.conv.conv.weight' has no place",
    "missing": "tensor 'blocks.9.mobile_inverted_conv.point_linear.bn.running_var' (floating of shape (80,)) "
               "is missing",
    "twice": "is given twice",
    "cifar-weights": "already a supernet weights file of this project",
    "not-a-state-dict": "not a state dict of tensors",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_other_files_are_one_line_exit_2(tmp_path, capsys, reference, kind):
    path = _bad_file(tmp_path, kind, reference)
    assert main(["import-supernet", str(path), str(tmp_path / "out.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("import-supernet: ") and captured.err.count("\n") == 1, captured.err
    assert BAD[kind] in captured.err and str(path) in captured.err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "EXPLOITED").exists()


def test_command_help_and_success(tmp_path, capsys, reference):
    with pytest.raises(SystemExit) as exit_info:
        main(["import-supernet", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "drive.google.com" in text and "imagenet-OFA" in text and "GPU-hours" in text
    torch.save({"state_dict": respelled(reference)}, tmp_path / "imagenet-OFA")
    assert main(["import-supernet", str(tmp_path / "imagenet-OFA"), str(tmp_path / "w" / "ofa.pt"),
                 "--dtype", "float16"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "446 tensors" in line and "eps 0.001" in line
    net = load_supernet(str(tmp_path / "w" / "ofa.pt"))
    assert bn_param(net) == REFERENCE_BN


def test_reexport_keeps_the_batchnorm_parameters(imported, tmp_path):
    """`apq export-supernet` of an imported file (e.g. to float16) keeps eps and momentum."""
    out = export_supernet_weights(imported[1], tmp_path / "half.pt")
    assert bn_param(load_supernet(str(out))) == {"eps": 1e-3, "momentum": 0.1}
    assert torch.load(out, weights_only=True)["batchnorm"] == {"eps": 1e-3, "momentum": 0.1}


def test_a_quantized_export_keeps_the_batchnorm_parameters(imported, tmp_path):
    """Stage 7's quantized file rebuilds the subnet: eps must come back with it."""
    from apq_lightning.quant import load_quantized, quantize_subnet, save_quantized

    subnet = SPACE.smallest(8)
    model = quantize_subnet(load_supernet(str(imported[1])).extract(subnet).eval(), subnet,
                            [torch.randn(2, 3, 32, 32)], method="minmax")
    x = torch.randn(2, 3, 32, 32)
    loaded = load_quantized(save_quantized(model, tmp_path / "q.pt"))
    assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_cost_command_prices_either_rule_on_request(tmp_path, capsys):
    """`apq cost` on an APQ spec prices the network APQ runs; `--apq-rounding cost` prices what the
    reference's latency predictor priced (its published latencies)."""
    import json

    from apq_lightning.hardware import get_cost_model

    spec = {**apq_specs()[-1], **{f"{f}_bits_setting": [8] * 21 for f in ("pw_w", "pw_a", "dw_w", "dw_a")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    model = get_cost_model("bitfusion", "apq_imagenet")
    latency = {}
    for rounding in ("network", "cost"):
        extra = [] if rounding == "network" else ["--apq-rounding", "cost"]
        assert main(["cost", "--hardware", "bitfusion", "--subnet", str(tmp_path / "spec.json"), *extra]) == 0
        latency[rounding] = json.loads(capsys.readouterr().out)["latency_ms"]
        assert latency[rounding] == model.costs(Subnet.from_apq(spec, rounding=rounding))["latency_ms"]
    assert latency["network"] > latency["cost"]  # 96 channels run where 88 were priced
