"""Predictor-transfer study (APQ, CVPR 2020, Figure 7): now the ``apq transfer-study`` command.

The study lives in :mod:`apq_lightning.transfer_study` (see its docstring and docs/predictor.md);
this script only forwards its arguments, so older notes that call it keep working:

    python -m apq_lightning.cli transfer-study --fp-stores 'runs/collect_fp_cifar/samples*.jsonl' \\
        --mp-stores 'runs/collect_mp_cifar/samples*.jsonl' --space apq_cifar \\
        --sizes 50,100,200,400,all --seeds 0,1,2 --losses mse,ranking --epochs 150 --out runs/transfer_study

    python benchmarks/transfer_study.py ...   # the same options
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apq_lightning.transfer_study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
