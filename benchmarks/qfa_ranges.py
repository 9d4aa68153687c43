"""Which activation ranges train the quantized-for-all phase better? (issue 15, item 1)

When the bit policy changes every step, an activation quantizer's range can come from

* ``batch``: the batch's own range quantizes the batch (nothing is clipped, the range is always
  right for the current policy and subnet; BatchQuant's idea), or
* ``running``: one running range per quantizer, shared by every subnet and policy trained,
  quantizes the batch and clips what lies beyond it (OQAT shares learned ranges across
  architectures; this is the averaged, not learned, form).

Both start from the same float supernet, train ``--steps`` steps of the quant phase of
``--recipe`` with the same seed, data order and subnets/policies (only ``quant_ranges`` differs),
and are then scored like ``qfa`` samples: ``--pairs`` (architecture, 'spread' policy) pairs of the
MP collection's sampler, BatchNorm and ranges re-estimated on the same fixed images, top-1 on the
same held-out images; plus the largest and smallest subnet at uniform 4 bits. Reported: mean
top-1 per arm, and the paired difference ``running - batch`` with its standard error over pairs.
The float supernet itself (quantizers attached, ranges re-estimated, no quant training) is scored
beside them: what the quant phase buys.

    python benchmarks/qfa_ranges.py --data PATH/cifar10-jpeg.tar.gz --init weights/apq_cifar_supernet.pt \\
        --steps 150 --pairs 24 --out runs/qfa_ranges --report docs/results/cifar10_study/qfa_ranges.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.checked_cli import build_cli  # noqa: E402
from apq_lightning.collection.sampling import MPSampling, mp_subnet  # noqa: E402
from apq_lightning.data import ImageDataModule  # noqa: E402
from apq_lightning.final.results import paired_difference  # noqa: E402
from apq_lightning.metrics import top1  # noqa: E402
from apq_lightning.outputs import write_json  # noqa: E402
from apq_lightning.quant.supernet import QFA_RANGES, quantize_supernet, reestimate_supernet  # noqa: E402
from apq_lightning.supernet import Supernet  # noqa: E402
from apq_lightning.supernet_io import load_supernet, save_supernet_weights  # noqa: E402

CL = torch.channels_last


def train_arm(args: argparse.Namespace, ranges: str) -> Path:
    """``--steps`` steps of the recipe's quant phase with ``quant_ranges=ranges``; its weights file."""
    run = Path(args.out) / ranges
    weights = run / "qfa.pt"
    if weights.is_file():  # resumable: an arm trained by an earlier run
        return weights
    torch.manual_seed(args.seed)
    cli = build_cli(["--config", args.recipe, "--data.init_args.root", args.data,
                     "--model.init_args.init_weights", args.init, "--model.init_args.quant_ranges", ranges,
                     "--model.init_args.warmup_epochs", "0", "--trainer.max_steps", str(args.steps),
                     "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
                     "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                     "--trainer.callbacks", "[]", "--seed_everything", str(args.seed)], run=False)
    t = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    print(f"{ranges}: {args.steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    return save_supernet_weights(cli.model.supernet, weights, torch.float32)


def score(net: Supernet, subnets: list, bn: list, heldout: list) -> list[float]:
    accs = []
    with torch.inference_mode(False):
        for sub in subnets:
            net.set_active(sub)
            reestimate_supernet(net, bn)
            accs.append(top1(net, heldout))
    return accs


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """``a - b`` per pair (the same subnets and images): mean ± SE in points, and the signs."""
    mean, se = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b)]
    return {"mean_diff_pts": 100 * mean, "se_pts": 100 * se, "wins": sum(x > 0 for x in d),
            "losses": sum(x < 0 for x in d), "n": len(d)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or its ImageFolder tree")
    ap.add_argument("--init", default="weights/apq_cifar_supernet.pt", help="the float supernet to start from")
    ap.add_argument("--recipe", default="recipes/supernet_cifar_qfa.yaml", help="its quant phase is trained")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--eval-batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="work directory (the arms' weights); rerun to resume")
    ap.add_argument("--report", default=None, help="JSON of the numbers (default OUT/qfa_ranges.json)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=WEIGHTS",
                    help="score another quantized-for-all supernet beside the arms (e.g. the shipped one)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.pairs < 2:
        ap.error("--steps must be >= 1 and --pairs >= 2")
    arms = {r: train_arm(args, r) for r in QFA_RANGES}

    dm = ImageDataModule("cifar10", root=args.data, image_size=32)
    dm.setup("fit")
    bn = [x.contiguous(memory_format=CL) for x, _ in dm.calib_dataloader(2, 256)]
    heldout, seen = [], 0
    for x, y in dm.heldout_dataloader(args.eval_batch_size):
        heldout.append((x.contiguous(memory_format=CL), y))
        seen += len(y)
        if seen >= args.eval_images:
            break
    sampling = MPSampling()
    space = load_supernet(args.init).space
    subnets = [mp_subnet(space, args.seed, i, sampling)[1] for i in range(args.pairs)]
    uniform4 = {"largest": space.largest(4), "smallest": space.smallest(4)}

    nets = {"float supernet (no quant phase)": quantize_supernet(load_supernet(args.init), ranges="batch")}
    nets.update({f"quant phase, {r} ranges": load_supernet(str(w)) for r, w in arms.items()})
    for item in args.also:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--also {item!r}: expected NAME=WEIGHTS with an existing weights file")
        nets[name] = load_supernet(path)
    results: dict[str, dict] = {}
    for name, net in nets.items():
        net.to(memory_format=CL)
        t = time.perf_counter()
        accs = score(net, subnets, bn, heldout)
        u4 = dict(zip(uniform4, score(net, list(uniform4.values()), bn, heldout)))
        results[name] = {"pairs_mean_acc": statistics.mean(accs), "accs": accs, "uniform4": u4}
        print(f"{name}: pairs {statistics.mean(accs):.4f}, 4-bit largest {u4['largest']:.4f}, smallest "
              f"{u4['smallest']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    names = list(nets)
    out = {"steps": args.steps, "pairs": args.pairs, "eval_images": seen, "init": args.init, "recipe": args.recipe,
           "arms": results,
           "running_minus_batch": paired(results[names[2]]["accs"], results[names[1]]["accs"]),
           "batch_minus_float": paired(results[names[1]]["accs"], results[names[0]]["accs"]),
           "running_minus_float": paired(results[names[2]]["accs"], results[names[0]]["accs"])}
    for name in names[3:]:
        out[f"{name}_minus_float"] = paired(results[name]["accs"], results[names[0]]["accs"])
    for k in [k for k in out if k.endswith(("_minus_batch", "_minus_float"))]:
        d = out[k]
        print(f"{k}: {d['mean_diff_pts']:+.2f} ± {d['se_pts']:.2f} pts (SE over {d['n']} pairs; "
              f"{d['wins']} up, {d['losses']} down)")
    report = Path(args.report or Path(args.out) / "qfa_ranges.json")
    write_json(report, out)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
