"""The weights-only supernet file: what later stages load instead of a stage-1 checkpoint."""

from __future__ import annotations

import pytest
import torch

from apq_lightning.final.pipeline import supernet_space
from apq_lightning.supernet import Supernet
from apq_lightning.supernet_io import CHECKPOINT_PREFIX, WEIGHTS_FORMAT, export_supernet_weights, load_supernet


def _trained_like_checkpoint(path, space: str = "tiny", num_classes: int = 10):
    """A SupernetModule-shaped checkpoint with non-trivial weights and BN statistics."""
    torch.manual_seed(0)
    net = Supernet(space, num_classes)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    state = {CHECKPOINT_PREFIX + k: v for k, v in net.state_dict().items()}
    state["teacher.fc.weight"] = torch.ones(3)  # other entries of the module are not the supernet's
    torch.save({"state_dict": state, "hyper_parameters": {"space": space, "num_classes": num_classes,
                                                          "dropout": 0.0, "lr": 0.1},
                "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(1000)}}}]}, path)
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_export_roundtrip_gives_the_same_network(tmp_path, dtype):
    ref = _trained_like_checkpoint(tmp_path / "last.ckpt")
    out = export_supernet_weights(tmp_path / "last.ckpt", tmp_path / "w" / "supernet.pt", dtype=dtype)
    raw = torch.load(out, weights_only=True)  # plain data: loadable without trusting code
    assert raw["format"] == WEIGHTS_FORMAT and raw["space"] == "tiny" and raw["num_classes"] == 10
    assert not any(k.startswith(CHECKPOINT_PREFIX) or k.startswith("teacher") for k in raw["state_dict"])
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {dtype}
    net = load_supernet(str(out)).eval()
    assert all(v.dtype != torch.float16 for v in net.state_dict().values())  # cast back for CPU training
    x = torch.randn(4, 3, 32, 32)
    for subnet in (net.space.largest(), net.space.smallest()):
        ref.set_active(subnet)
        net.set_active(subnet)
        with torch.no_grad():
            a, b = ref(x), net(x)
        tol = 0 if dtype == torch.float32 else 5e-2 * a.abs().max().item()
        assert (a - b).abs().max().item() <= tol
    assert supernet_space(out) == ("tiny", 10)  # `apq final --supernet` takes it too


def test_float16_file_is_about_half(tmp_path):
    _trained_like_checkpoint(tmp_path / "last.ckpt")
    half = export_supernet_weights(tmp_path / "last.ckpt", tmp_path / "h.pt").stat().st_size
    full = export_supernet_weights(tmp_path / "last.ckpt", tmp_path / "f.pt", torch.float32).stat().st_size
    assert half < 0.6 * full < (tmp_path / "last.ckpt").stat().st_size


def test_export_refuses_bad_input(tmp_path):
    _trained_like_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="dtype torch.int8: allowed float16, bfloat16, float32"):
        export_supernet_weights(tmp_path / "last.ckpt", tmp_path / "x.pt", torch.int8)
    torch.save({"hello": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a SupernetModule checkpoint"):
        export_supernet_weights(tmp_path / "other.ckpt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_damaged_weights_file_is_named(tmp_path):
    torch.save({"format": WEIGHTS_FORMAT, "space": "tiny", "num_classes": 10, "state_dict": {"nope": torch.ones(1)}},
               tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w.pt: damaged supernet weights file \(Error\(s\) in loading"):
        load_supernet(str(tmp_path / "w.pt"))


def test_export_command(tmp_path, capsys):
    from apq_lightning.cli import main

    _trained_like_checkpoint(tmp_path / "last.ckpt")
    assert main(["export-supernet", str(tmp_path / "last.ckpt"), str(tmp_path / "w.pt")]) == 0
    assert "w.pt" in capsys.readouterr().out and load_supernet(str(tmp_path / "w.pt")).space.name == "tiny"
    assert main(["export-supernet", str(tmp_path / "nope.ckpt"), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export-supernet: checkpoint") and "nope.ckpt not found" in err and err.count("\n") == 1


def test_shipped_apq_cifar_weights_load_safely():
    """The one committed weights file: small, plain data, the apq_cifar supernet."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "weights" / "apq_cifar_supernet.pt"
    assert path.is_file() and path.stat().st_size <= 3 * 2**20
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == WEIGHTS_FORMAT and raw["space"] == "apq_cifar" and raw["num_classes"] == 10
    net = load_supernet(str(path)).eval()
    assert net.space.name == "apq_cifar"
    assert supernet_space(path) == ("apq_cifar", 10)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_shipped_apq_cifar_qfa_weights_load_as_a_quantized_for_all_supernet():
    """The quantized-for-all file: small, plain data, batch-range quantizers rebuilt on load."""
    from pathlib import Path

    from apq_lightning.quant.supernet import is_batch_quantized

    path = Path(__file__).resolve().parents[1] / "weights" / "apq_cifar_qfa_supernet.pt"
    assert path.is_file() and path.stat().st_size <= 3 * 2**20
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == WEIGHTS_FORMAT and raw["space"] == "apq_cifar"
    net = load_supernet(str(path)).eval()
    assert is_batch_quantized(net)
    float_net = load_supernet(str(path.with_name("apq_cifar_supernet.pt")))
    assert not is_batch_quantized(float_net)
    net.set_active(net.space.sample(0, quantized=True))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
