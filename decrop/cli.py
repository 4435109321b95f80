"""Command line: ``python -m decrop run --config configs/quick.yaml [--set key=value ...] [--out DIR]``.

``run``     train (or reuse) the classifier, train each method's denoiser on the limited subset, certify, and
            print the method x radius table. Writes everything to --out (default runs/<name>-<time>).
``config``  print the resolved config, or with --keys every key with its default and meaning.
Configuration errors are reported before any compute, as one line naming the key.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .bounds import max_certifiable_radius
from .checkpoint import CheckpointError
from .config import ConfigError, describe, load_config, to_yaml
from .data import DatasetNotFoundError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decrop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train and certify one experiment"), ("config", "show the resolved config")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None, help="YAML profile, e.g. configs/quick.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set train.epochs=5")
        if name == "run":
            p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<name>-<time>)")
            p.add_argument("--blackbox", action="store_true",
                           help="also run DE-CROP in the black-box setting (same as adding decrop_blackbox to "
                                "the methods key)")
        else:
            p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config" and args.keys:
            for key, default, text in describe():
                print(f"{key:28s} {default:24s} {text}")
            return 0
        overrides = list(args.overrides)
        if getattr(args, "blackbox", False):
            base = load_config(args.config, overrides)
            if "decrop_blackbox" not in base.methods:
                overrides.append(f"methods={[*base.methods, 'decrop_blackbox']}")
        cfg = load_config(args.config, overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        from .pipeline import format_table, run_experiment  # torch-heavy: only once the config is valid

        out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"decrop run: writing to {out}", flush=True)
        tic = time.perf_counter()
        table = run_experiment(cfg, out)
        print(f"\nCertified accuracy (%) under sigma={cfg.sigma}, {cfg.data.percent}% of {cfg.data.dataset} "
              f"training data, n={cfg.certify.n}, alpha={cfg.certify.alpha}:")
        print(format_table(table))
        limit = max_certifiable_radius(cfg.certify.n, cfg.certify.alpha, cfg.sigma)
        if limit < max(cfg.certify.radii):
            print(f"(with n={cfg.certify.n} and alpha={cfg.certify.alpha} no radius above {limit:.3f} can be "
                  f"certified: raise certify.n to report larger radii)")
        print(f"\nwall time {time.perf_counter() - tic:.0f}s; results in {out}")
        return 0
    except (ConfigError, DatasetNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
