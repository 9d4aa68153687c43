"""``lut`` and ``cost`` commands (dispatched by ``python -m apq_lightning.cli``).

    python -m apq_lightning.cli lut build --space apq_cifar --device cpu --out lut.json
    python -m apq_lightning.cli cost --hardware bitfusion --subnet winner.json
    python -m apq_lightning.cli cost --hardware lut:lut.json --subnet population.jsonl

``argv`` is what follows the command word (``["build", "--space", ...]`` for ``lut``).
Errors in the user's input (unknown space, malformed table or subnet file, a bad option value)
print one line to stderr and return 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from apq_lightning.hardware.cost import CostModel, get_cost_model, json_ready, list_cost_models
from apq_lightning.space import Subnet, list_spaces, load_subnets


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (``apq cost: argument --x: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``, so that ``--batch 0`` fails before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _lut_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="apq lut", description="Latency lookup tables measured on this machine.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    b = sub.add_parser("build", help="time every distinct layer of a space and write a table (resumable)")
    b.add_argument("--space", required=True, help=f"one of {', '.join(list_spaces())}")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--out", required=True, help="table JSON to write (an existing partial table is resumed)")
    b.add_argument("--batch", type=_int_at_least(1), default=1, help="batch size of every timed pass (default 1)")
    b.add_argument("--repeats", type=_int_at_least(1), default=30, help="timed passes per layer (default 30)")
    b.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed passes first (default 5)")
    b.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic over the repeats (min resists other jobs on a shared machine)")
    b.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--num-classes", type=_int_at_least(1), default=None, help="classifier width (default 1000 for "
                   "apq_imagenet, 10 otherwise)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def lut_main(argv: Sequence[str]) -> int:
    """``lut build ...``: measure a table; prints a one-line summary."""
    args = _lut_parser().parse_args(list(argv))
    if Path(args.out).is_dir():
        print(f"lut build: --out {args.out} is a directory; give a table file path such as "
              f"{Path(args.out) / 'lut.json'}", file=sys.stderr)
        return 2
    from apq_lightning.hardware.measure import build_table  # torch only when measuring

    try:
        table = build_table(args.space, args.out, device=args.device, batch=args.batch, repeats=args.repeats,
                            warmup=args.warmup, num_classes=args.num_classes, threads=args.threads,
                            stat=args.stat, progress=not args.no_progress)
    except (ValueError, OSError) as err:  # OSError: --out not writable
        print(f"lut build: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(table)} layers + head/tail of space {args.space} on {table.meta['device_name']} "
          f"({args.device}, batch {args.batch}); use it with --hardware lut:{args.out}")
    return 0


def _cost_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="apq cost", description="Latency, energy, BitOps and size of subnets.")
    p.add_argument("--hardware", default="bitfusion", help=f"one of {', '.join(list_cost_models())}")
    p.add_argument("--subnet", required=True, help="a subnet .json (one object or a list) or a .jsonl (one per "
                   "line); project format or the APQ reference spec (ks / e / d)")
    p.add_argument("--space", default=None, help="space of subnets that do not name one (APQ specs: "
                   "apq_imagenet)")
    p.add_argument("--num-classes", type=_int_at_least(1), default=None,
                   help="classifier width (default 1000 for apq_imagenet, 10 otherwise)")
    p.add_argument("--apq-rounding", choices=("network", "cost"), default="network",
                   help="how an APQ spec's expand ratio e becomes channels: network (default) = "
                        "make_divisible(round(e*Cin), 8), the network APQ runs; cost = make_divisible(e*Cin, 8), "
                        "as APQ's latency converter priced it (reproduces its published latencies)")
    return p


def cost_main(argv: Sequence[str]) -> int:
    """``cost --hardware H --subnet FILE``: one JSON object per subnet on stdout."""
    args = _cost_parser().parse_args(list(argv))
    models: dict[str, CostModel] = {}
    try:
        subnets = load_subnets(args.subnet, args.space, args.apq_rounding)
        for subnet in subnets:
            print(json.dumps(json_ready(_costs(subnet, args, models))))
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, permissions
        print(f"cost: {err}", file=sys.stderr)
        return 2
    return 0


def _costs(subnet: Subnet, args: argparse.Namespace, models: dict[str, CostModel]) -> dict:
    """Costs of one subnet with the (cached) model of its space, space and hardware first."""
    if subnet.space not in models:
        kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
        models[subnet.space] = get_cost_model(args.hardware, subnet.space, **kw)
    out = {"space": subnet.space, "hardware": models[subnet.space].hardware}
    out.update(models[subnet.space].costs(subnet))
    return out
