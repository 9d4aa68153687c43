"""Cost of one collected sample (stages 2 and 4) on apq_cifar / CIFAR-10, against pure inference.

Runs the real collection (``trainer.predict`` with the settings of ``recipes/collect_fp.yaml``
and ``recipes/collect_mp.yaml``, into a temporary store) and, right after each sample, in the
same process, times the *pure eval-mode inference* of the same subnet on the same held-out
images (the extracted float subnet, NHWC, no BatchNorm re-calibration): the two alternate, so
machine noise hits both alike.

* FP (goal: seconds per sample ÷ pure inference <= 1.5): split into BN re-calibration and
  evaluation; the other ``mode`` (in the supernet vs. extracted) is timed beside it.
* MP (goal: <= 30 s per sample on 2 CPU cores): split into BN re-calibration, KL calibration,
  QAT and evaluation, and the same ratio to pure inference.
* ``--bit-study K``: K architectures at uniform 4 / 6 / 8 bits (the MP recipe's QAT), beside their
  float accuracy: does quantization still matter after the short QAT?

Wall-clock time on a shared machine is noise; CPU time (``time.process_time``) is printed beside
it: on an idle machine with T threads, wall ≈ CPU / T.

    python benchmarks/collection_cost.py --archive PATH/cifar10-jpeg.tar.gz \
        [--ckpt runs/supernet_cifar/checkpoints/last.ckpt] [--threads 1]
    APQ_CIFAR_ARCHIVE=PATH python benchmarks/collection_cost.py --fp-samples 10 --mp-samples 4 --bit-study 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from apq_lightning.collection import SampleRecord, SampleWriter, measure_fp, read_samples
from apq_lightning.data import SampleIndexDataModule
from apq_lightning.metrics import top1
from apq_lightning.modules import FPCollectionModule, MPCollectionModule

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last


def recipe_args(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model init_args, data init_args)`` of a recipe: the benchmark measures its defaults."""
    cfg = yaml.safe_load((ROOT / "recipes" / name).read_text())
    return dict(cfg["model"]["init_args"]), dict(cfg["data"]["init_args"])


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class SideBySide(L.Callback):
    """After each collected sample: pure inference of the same subnet on the same images."""

    def __init__(self, other_mode: str | None = None) -> None:
        self.rows: list[dict[str, float]] = []
        self.other_mode = other_mode

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._c0 = clock()

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        w1, c1 = clock()
        for rec in outputs:
            assert isinstance(rec, SampleRecord)
            subnet = rec.to_subnet()
            arch = subnet.with_bits(None)
            row = {
                "acc": rec.acc,
                "wall": w1 - self._c0[0],
                "cpu": c1 - self._c0[1],
                "blocks": len(subnet.active_blocks),
                **{k: v for k, v in rec.timing.items()},
            }
            model = pl_module.supernet.extract(arch).to(memory_format=CL).eval()
            with torch.inference_mode():
                top1(model, pl_module.eval_batches()[:1])  # warm-up of this shape's kernels
                w, c = clock()
                top1(model, pl_module.eval_batches())
                w2, c2 = clock()
            row["pure_wall"], row["pure_cpu"] = w2 - w, c2 - c
            if self.other_mode is not None:
                with torch.inference_mode():
                    w, c = clock()
                    res = measure_fp(
                        pl_module.supernet,
                        arch,
                        pl_module.bn_images(),
                        pl_module.eval_batches(),
                        self.other_mode,
                        pl_module.hparams.channels_last,
                    )
                    w2, c2 = clock()
                row["other_wall"], row["other_cpu"], row["other_acc"] = w2 - w, c2 - c, res.acc
            self.rows.append(row)


def run(
    module: L.LightningModule, data: dict[str, Any], n: int, out: Path, callback: SideBySide
) -> list[dict[str, float]]:
    dm = SampleIndexDataModule(**{**data, "num_samples": n, "output_dir": str(out)})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SampleWriter(summary=False), callback],
    )
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return callback.rows


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--archive",
        default=os.environ.get("APQ_CIFAR_ARCHIVE"),
        help="CIFAR-10 .tar.gz or tree (or $APQ_CIFAR_ARCHIVE)",
    )
    ap.add_argument("--ckpt", default=None, help="stage-1 checkpoint (default: a random apq_cifar supernet)")
    ap.add_argument("--fp-samples", type=int, default=8)
    ap.add_argument("--mp-samples", type=int, default=3)
    ap.add_argument("--bit-study", type=int, default=0, metavar="K", help="K architectures at uniform 4/6/8 bits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qat-steps", type=int, default=None, help="override the MP recipe's qat_steps")
    ap.add_argument("--protocol", default="short_qat", choices=("short_qat", "qfa"),
                    help="MP protocol (the recipe's default qfa needs a quantized-for-all --ckpt); "
                         "benchmarks/label_noise.py compares the two")
    args = ap.parse_args(argv)
    if not args.archive or not Path(args.archive).exists():
        ap.error(f"give --archive PATH (or set APQ_CIFAR_ARCHIVE); got {args.archive!r}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    fp_model, fp_data = recipe_args("collect_fp.yaml")
    mp_model, mp_data = recipe_args("collect_mp.yaml")
    for d in (fp_data, mp_data):
        d["root"] = args.archive
    fp_model["supernet_ckpt"] = mp_model["supernet_ckpt"] = args.ckpt
    mp_model["protocol"] = args.protocol
    if args.qat_steps is not None:
        mp_model["qat_steps"] = args.qat_steps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs; supernet {args.ckpt or 'random apq_cifar'}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.fp_samples:
            other = "inplace" if fp_model.get("mode", "inplace") == "extract" else "extract"
            rows = run(FPCollectionModule(**fp_model), fp_data, args.fp_samples, tmp_path / "fp", SideBySide(other))
            report_fp(rows, fp_model, other)
        if args.mp_samples:
            rows = run(MPCollectionModule(**mp_model), mp_data, args.mp_samples, tmp_path / "mp", SideBySide())
            report_mp(rows, mp_model, args.threads)
        if args.bit_study:
            bit_study(args.bit_study, mp_model, mp_data, tmp_path)
    return 0


def report_fp(rows: list[dict[str, float]], cfg: dict[str, Any], other: str) -> None:
    print(
        f"\nFP samples (stage 2), mode {cfg.get('mode')}: BN on {cfg['bn_batches']} x {cfg['bn_batch_size']} images, "
        f"eval on {cfg['eval_images']} held-out images, {len(rows)} random subnets"
    )
    print(
        f"{'#':>3} {'blocks':>6} {'acc':>7} {'sample s':>9} {'BN s':>7} {'eval s':>7} {'pure s':>7} {'ratio':>6} "
        f"{other + ' s':>10} {'ratio':>6} {'cpu ratio':>9}"
    )
    for i, r in enumerate(rows):
        print(
            f"{i:3d} {r['blocks']:6d} {r['acc']:7.4f} {r['wall']:9.3f} {r['bn_s']:7.3f} {r['eval_s']:7.3f} "
            f"{r['pure_wall']:7.3f} {r['wall'] / r['pure_wall']:6.2f} {r['other_wall']:10.3f} "
            f"{r['other_wall'] / r['pure_wall']:6.2f} {r['cpu'] / r['pure_cpu']:9.2f}"
        )
    tot = sum(r["wall"] for r in rows) / sum(r["pure_wall"] for r in rows)
    tot_cpu = sum(r["cpu"] for r in rows) / sum(r["pure_cpu"] for r in rows)
    tot_other = sum(r["other_wall"] for r in rows) / sum(r["pure_wall"] for r in rows)
    same = all(abs(r["acc"] - r["other_acc"]) < 1e-9 for r in rows)
    print(
        f"FP: {mean(rows, 'wall'):.3f} s/sample (BN {mean(rows, 'bn_s'):.3f} s + eval {mean(rows, 'eval_s'):.3f} s), "
        f"pure inference {mean(rows, 'pure_wall'):.3f} s -> sample / pure = {tot:.2f} wall, {tot_cpu:.2f} CPU "
        f"(goal <= 1.5); mode {other}: {tot_other:.2f}; same accuracy in both modes: {same}"
    )


def report_mp(rows: list[dict[str, float]], cfg: dict[str, Any], threads: int) -> None:
    print(
        f"\nMP samples (stage 4): QAT {cfg['qat_steps']} steps x {cfg['qat_batch_size']}, calibration "
        f"{cfg['calib_batches']} x {cfg['calib_batch_size']}, eval on {cfg['eval_images']} images, {len(rows)} samples"
    )
    print(
        f"{'#':>3} {'blocks':>6} {'acc':>7} {'sample s':>9} {'cpu s':>7} {'BN s':>6} {'calib s':>7} {'QAT s':>7} "
        f"{'eval s':>7} {'pure s':>7} {'ratio':>6}"
    )
    for i, r in enumerate(rows):
        print(
            f"{i:3d} {r['blocks']:6d} {r['acc']:7.4f} {r['wall']:9.2f} {r['cpu']:7.2f} {r['bn_s']:6.2f} "
            f"{r['calib_s']:7.2f} {r['qat_s']:7.2f} {r['eval_s']:7.2f} {r['pure_wall']:7.3f} "
            f"{r['wall'] / r['pure_wall']:6.1f}"
        )
    w = mean(rows, "wall")
    print(
        f"MP: {w:.2f} s/sample wall, {mean(rows, 'cpu'):.2f} CPU-s (≈ {mean(rows, 'cpu') / threads:.1f} s wall on "
        f"{threads} idle core(s); goal <= 30 s); shares: BN {mean(rows, 'bn_s') / w:.0%}, calibration "
        f"{mean(rows, 'calib_s') / w:.0%}, QAT {mean(rows, 'qat_s') / w:.0%}, eval {mean(rows, 'eval_s') / w:.0%}; "
        f"sample / pure inference = {sum(r['wall'] for r in rows) / sum(r['pure_wall'] for r in rows):.1f}"
    )


def bit_study(k: int, mp_model: dict, mp_data: dict, tmp: Path) -> None:
    """Mean accuracy of the same K architectures (the ``mp_random`` ones of the recipe's seed):
    uniform 4 / 6 / 8 bits after calibration + the recipe's short QAT, and float (BN
    re-calibrated, the same images)."""
    accs: dict[str, list[float]] = {}
    module = None
    archs: list = []
    for bits in (4, 6, 8):
        module = MPCollectionModule(**{**mp_model, "uniform_bits": bits, "arch_policies_fraction": 0.0})
        run(module, mp_data, k, tmp / f"u{bits}", SideBySide())
        recs = sorted(read_samples(tmp / f"u{bits}"), key=lambda r: r.index)
        accs[f"uniform {bits}"] = [r.acc for r in recs]
        archs = [r.to_subnet().with_bits(None) for r in recs]
    assert module is not None
    with torch.inference_mode():  # the last module's cached BN / eval images: the same as the MP runs'
        accs["float"] = [
            measure_fp(module.supernet, a, module.bn_images(), module.eval_batches(), "extract").acc for a in archs
        ]
    print(
        f"\nBit study: {k} architectures (mp_random of seed {mp_model['seed']}), QAT {mp_model['qat_steps']} steps, "
        f"eval on {mp_model['eval_images']} held-out images"
    )
    print(f"{'policy':>10} {'mean acc':>9}   per architecture")
    for name in ("float", "uniform 8", "uniform 6", "uniform 4"):
        vals = accs[name]
        print(f"{name:>10} {sum(vals) / len(vals):9.4f}   " + " ".join(f"{v:.4f}" for v in vals))


if __name__ == "__main__":
    sys.exit(main())
