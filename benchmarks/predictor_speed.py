"""Accuracy-predictor speed: training an MP predictor and scoring search populations.

Two measurements, each as a pair run side by side so that the *ratio* is the result (absolute
times on a shared machine are noise):

1. **Training**: one epoch of MP predictor training on ``--train`` synthetic samples read from
   a sample store (the paper's FP predictor uses 80k), through Lightning
   (``PredictorModule`` + ``SubnetSampleDataModule``, batches encoded from genomes on the fly)
   vs. a bare PyTorch loop over pre-encoded tensors, interleaved, best of ``--train-repeats``:
   the ratio is what the framework and the per-batch encoding cost. Reading the store (parsing and
   validating every record) is timed separately.
2. **Prediction**: ``--predict`` predictions from integer genomes with
   ``AccuracyPredictor.predict`` (sparse first layer: sums of the weight rows the one-hot
   selects) vs. encoding dense features and running the dense forward.

    python benchmarks/predictor_speed.py [--space apq_imagenet] [--train 80000] [--predict 100000]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def write_store(path: Path, space: str, n: int, seed: int = 0) -> None:
    """``n`` MP records (random architecture + policy) with a synthetic accuracy, fast: the
    subnet dicts are built from genomes without a ``Subnet`` per record."""
    import hashlib
    import json

    from apq_lightning.encoding import get_encoder
    from apq_lightning.space import BIT_FIELDS, get_space

    sp = get_space(space)
    enc = get_encoder(sp)
    genomes = sp.sample_genomes(seed, n)
    w = np.random.default_rng(seed).normal(0, 0.01, enc.dim)
    accs = np.clip(0.6 + enc.encode_genomes(genomes) @ w, 0, 1)
    vals = np.zeros_like(genomes)
    for j, choices in enumerate(sp.gene_choices):
        vals[:, j] = np.asarray(choices)[genomes[:, j]]
    active = sp.genome_active(genomes)
    sl = sp.genome_slices()
    with open(path, "w") as fh:
        for i in range(n):
            a = active[i]
            sub = {"space": sp.name, "depths": vals[i, sl["depths"]].tolist(),
                   "kernels": np.where(a, vals[i, sl["kernels"]], 0).tolist(),
                   "widths": np.where(a, vals[i, sl["widths"]], 0).tolist(),
                   "bits": {f: np.where(a, vals[i, sl[f]], 0).tolist() for f in BIT_FIELDS}}
            key = hashlib.sha1(json.dumps(sub).encode()).hexdigest()[:12]
            rec = {"key": key, "subnet": sub, "acc": float(accs[i]), "index": i, "seed": seed, "kind": "mp_random",
                   "space": sp.name, "supernet_hash": "benchmark", "protocol": {}, "timing": {}}
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def bench_training(store: Path, space: str, batch_size: int, repeats: int) -> dict[str, float]:
    import lightning as L

    from apq_lightning.data import SubnetSampleDataModule
    from apq_lightning.modules import PredictorModule
    from apq_lightning.modules.predictor_module import APQ_TRAINING  # one-hot bits, Adam: the bare loop's

    t0 = time.perf_counter()
    dm = SubnetSampleDataModule([str(store)], quantized=True, space=space, batch_size=batch_size,
                                val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    read_s = time.perf_counter() - t0
    n = len(dm.dataset("train"))

    x, y = dm.dataset("train").__getitems__(range(n))  # pre-encoded, for the bare loop
    lightning_t, torch_t = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        # Lightning: one epoch, no validation, no logging or checkpoints
        module = PredictorModule(space=space, quantized=True, base_acc=0.6, cosine=False, **APQ_TRAINING)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        t0 = time.perf_counter()
        trainer.fit(module, dm)
        lightning_t.append(time.perf_counter() - t0)

        # bare PyTorch: the same network, optimiser and batch size
        model = PredictorModule(space=space, quantized=True, base_acc=0.6, **APQ_TRAINING).predictor
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        t0 = time.perf_counter()
        for idx in torch.randperm(n).split(batch_size):
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch_t.append(time.perf_counter() - t0)
    return {"n": n, "read_s": read_s, "lightning_s": min(lightning_t), "torch_s": min(torch_t)}


def bench_prediction(space: str, n: int, repeats: int) -> dict[str, float]:
    from apq_lightning.encoding import get_encoder
    from apq_lightning.predictor import AccuracyPredictor
    from apq_lightning.space import get_space

    pred = AccuracyPredictor(space, quantized=True).eval()
    genomes = get_space(space).sample_genomes(1, n)
    enc = get_encoder(space)

    def dense() -> torch.Tensor:
        with torch.no_grad():
            feats = torch.from_numpy(enc.encode_genomes(genomes))
            return torch.cat([pred(c) for c in feats.split(16384)])

    a, b = pred.predict(genomes), dense()  # warm-up, and the two agree
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    sparse_t, dense_t = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        pred.predict(genomes)
        sparse_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dense()
        dense_t.append(time.perf_counter() - t0)
    return {"n": n, "sparse_s": min(sparse_t), "dense_s": min(dense_t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="apq_imagenet")
    ap.add_argument("--train", type=int, default=80_000, help="training samples (one epoch)")
    ap.add_argument("--predict", type=int, default=100_000, help="predictions from genomes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="prediction timings (the minimum is reported)")
    ap.add_argument("--train-repeats", type=int, default=2, help="training epochs timed per side (minimum)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0 = torch's default; 1 is fastest on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "samples.jsonl"
        t0 = time.perf_counter()
        write_store(store, args.space, args.train)
        write_s = time.perf_counter() - t0
        tr = bench_training(store, args.space, args.batch_size, args.train_repeats)
    pr = bench_prediction(args.space, args.predict, args.repeats)

    print(f"\nMP predictor, space {args.space}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"{'measurement':<52} {'time':>9} {'rate':>16}")
    print("-" * 79)
    rows = [
        (f"write store, {tr['n']:,} records (synthetic)", write_s, tr["n"] / write_s, "rec/s"),
        (f"read + validate store, {tr['n']:,} records", tr["read_s"], tr["n"] / tr["read_s"], "rec/s"),
        (f"train 1 epoch, {tr['n']:,} samples, Lightning", tr["lightning_s"], tr["n"] / tr["lightning_s"], "samples/s"),
        (f"train 1 epoch, {tr['n']:,} samples, bare PyTorch loop", tr["torch_s"], tr["n"] / tr["torch_s"], "samples/s"),
        (f"predict {pr['n']:,} genomes, predict() (sparse)", pr["sparse_s"], pr["n"] / pr["sparse_s"], "pred/s"),
        (f"predict {pr['n']:,} genomes, dense encode + forward", pr["dense_s"], pr["n"] / pr["dense_s"], "pred/s"),
    ]
    for name, t, rate, unit in rows:
        print(f"{name:<52} {t:8.2f}s {rate:>10,.0f} {unit}")
    print("-" * 79)
    print(f"Lightning / bare loop (training time):   {tr['lightning_s'] / tr['torch_s']:.2f}x")
    print(f"dense / sparse (prediction time):        {pr['dense_s'] / pr['sparse_s']:.2f}x")


if __name__ == "__main__":
    main()
