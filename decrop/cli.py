"""Command line: ``python -m decrop run --config configs/quick.yaml [--set key=value ...] [--out DIR]``.

``run``      train (or reuse) the classifier, or take yours (``classifier.source``), train each method's denoiser
             on the limited subset (or your image folder, ``data.dataset=folder``), certify, and print the
             method x radius table. Writes everything to --out (default runs/<name>-<time>).
``config``   print the resolved config, or with --keys every key with its default and meaning.
``export``   write a run's (or a sweep trial's) smoothed model classifier(denoiser(x)) as one torch.export program
             with sigma in its metadata: ``export --run DIR --out smoothed.pt2 [--method decrop]``.
``predict``  Cohen's PREDICT (with abstain) through a smoothed model on a folder of new images, one row each.
``certify``  Cohen's CERTIFY of those images: ``certify --model smoothed.pt2 --images DIR [--n N --alpha A]``.
Configuration and input errors are reported before any compute, as one line naming the key or file and the fix
(exit code 2). The config is checked with light imports only (it is pure Python and YAML): torch is imported once
the config is valid, so a typo costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from .config import (BOUNDS, CertifyConfig, ExperimentConfig, FieldSpec, Method, check_name, describe, field_spec,
                     load_config, to_yaml)
from .errors import BAD_INPUT, ConfigError, FolderDataError

# Errors of bad input, printed as one line: config keys, data folders, model files, output folders.
ERRORS = (*BAD_INPUT, FileExistsError)
PROFILES = "configs/quick.yaml (a CPU demo in minutes) or configs/paper.yaml (the paper's scale, GPU hours)"


def check_output(path: Path, kind: str = "folder") -> None:
    """Before any compute: `path` (the `kind` of output the command will create: folder or file) must not exist
    (finished results are never overwritten: FileExistsError) and must not lie under a file (ConfigError)."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"--out {path} already exists; choose a new {kind} (finished results are never "
                              f"overwritten)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder; choose a path in a folder")
            return


# The flags of predict and certify that set a config field (dest -> section, field, help where the field's own
# reads wrong for the command): type, default, bounds and choices, and the help unless given, come from the field,
# so the command line and the config cannot drift apart.
SMOOTH_FLAGS: dict[str, tuple[type, str, str | None]] = {
    "n": (CertifyConfig, "n", None),
    "n0": (CertifyConfig, "n0", None),
    "alpha": (CertifyConfig, "alpha", None),
    "batch_size": (CertifyConfig, "batch_size", "noisy samples per forward pass"),  # no memory budget here
    "seed": (ExperimentConfig, "seed", "seed of the noise (image i's noise is seeded by (seed, i))"),
    "device": (ExperimentConfig, "device", None),
}


def _flag_field(dest: str) -> tuple[str, FieldSpec]:
    """(--flag, its field's spec) of a `SMOOTH_FLAGS` entry."""
    cls, name, _ = SMOOTH_FLAGS[dest]
    return f"--{dest.replace('_', '-')}", field_spec(cls, name)


def _add_field_flag(parser: argparse.ArgumentParser, dest: str) -> None:
    flag, spec = _flag_field(dest)
    kind = {"choices": spec.choices} if spec.choices else {"type": spec.type}
    text = f"{SMOOTH_FLAGS[dest][2] or spec.help} (default {spec.default})".replace("%", "%%")  # argparse formats it
    parser.add_argument(flag, default=spec.default, help=text, **kind)


def _check_field_flag(args: argparse.Namespace, dest: str) -> None:
    """ConfigError naming the flag and its allowed range when its value is outside its field's bounds."""
    flag, spec = _flag_field(dest)
    value = getattr(args, dest)
    if not spec.within(value):
        raise ConfigError(f"{flag} must be {_allowed(spec)}, got {value}")


def _allowed(spec: FieldSpec) -> str:
    """A field's bounds as a flag's error states them: '>= 1', 'in (0, 1)', 'in 0..4294967295'."""
    low = next(((k, v) for k, v in spec.bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in spec.bounds.items() if k in ("le", "lt")), None)
    if low is None or high is None:
        return " and ".join(f"{BOUNDS[k][1]} {v}" for k, v in spec.bounds.items())
    if spec.type is int and low[0] == "ge" and high[0] == "le":
        return f"in {low[1]}..{high[1]}"
    opening, closing = "(" if low[0] == "gt" else "[", ")" if high[0] == "lt" else "]"
    return f"in {opening}{low[1]}, {high[1]}{closing}"


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's smoothed model as a torch.export program")
    p.add_argument("--out", type=Path, required=True, help="the program to write, e.g. smoothed.pt2")
    p.add_argument("--run", type=Path, help="a `python -m decrop run` output folder")
    p.add_argument("--method", default="decrop", help=f"whose denoiser (default decrop; one of "
                                                      f"{', '.join(get_args(Method))})")
    p.add_argument("--trial", help="a sweep trial's id: its denoiser <storage>/denoisers/<trial>.pt")
    p.add_argument("--storage", type=Path, help="with --trial: the study's folder (e.g. ~/decrop-runs/quick-study)")
    p.add_argument("--config", type=Path, help="with --trial (or --denoiser): the config it was trained with "
                                               "(default <storage>/denoisers/<trial>.yaml)")
    p.add_argument("--denoiser", type=Path, help="a denoiser checkpoint, with --config")
    for name, text in (("predict", "Cohen's PREDICT on a folder of images"),
                       ("certify", "Cohen's CERTIFY on a folder of images")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", type=Path, required=True,
                       help="a smoothed model written by `export`. It is a torch.export program, so it is code: "
                            "its graph runs on every image; load only files you trust. Before torch reads it, decrop "
                            "refuses an archive with a member that torch would run while loading it (a pickle of "
                            "anything but tensors, compiled code, code in the program's JSON), and metadata "
                            "(sigma, classes, input shape) that disagrees with its config or program")
        p.add_argument("--images", type=Path, required=True,
                       help="a folder of PNG/JPEG images, or of class sub-folders named as the model's classes "
                            "or by their indices")
        for dest in SMOOTH_FLAGS:
            if dest != "n0" or name == "certify":
                _add_field_flag(p, dest)
        p.add_argument("--out", type=Path, default=None, help="write the rows here (default: print them)")


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
    _add_model_commands(sub)
    return parser


def _export(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.run, args.trial, args.denoiser)) != 1:
        raise ConfigError("export needs exactly one of --run DIR, --trial ID --storage DIR, --denoiser FILE --config "
                          "FILE")
    if args.trial is not None:
        check_name(args.trial, "--trial", "a1b2c_00000")  # a file name in <storage>/denoisers: no '/', no '..'
        if args.storage is None:
            raise ConfigError("--trial needs --storage, the study's folder (e.g. ~/decrop-runs/quick-study)")
    if args.denoiser is not None and args.config is None:
        raise ConfigError("--denoiser needs --config, the config it was trained with")
    check_output(args.out, "file")
    from .smoothed import export_run, run_sources, trial_sources  # torch-heavy: only once the flags are valid

    if args.run is not None:
        config, weights = run_sources(args.run, args.method)
    elif args.trial is not None:
        config, weights = trial_sources(args.storage.expanduser(), args.trial, args.config)
    else:
        config, weights = args.config, args.denoiser
    export_run(config, weights, args.out)
    return 0


def _smooth(args: argparse.Namespace) -> int:
    for dest in ("n", "batch_size", *(("n0",) if args.command == "certify" else ())):
        _check_field_flag(args, dest)
    if args.command == "certify" and args.n0 > args.n:
        raise ConfigError(f"--n0 {args.n0} exceeds --n {args.n}: n0 samples only pick the top class, n estimate its "
                          f"probability; lower --n0 or raise --n")
    for dest in ("alpha", "seed"):
        _check_field_flag(args, dest)
    if not args.images.is_dir():
        raise FolderDataError(f"--images {args.images} is not a folder: give a folder of PNG/JPEG images (or of "
                              f"class sub-folders)")
    if args.out is not None:
        check_output(args.out, "file")
    from .runtime import resolve_device, tune_allocator  # torch-heavy: only once the arguments are valid
    from .smoothed import certify_folder, format_rows, load_smoothed, predict_folder

    tune_allocator()
    device = resolve_device(args.device, "--device")
    model = load_smoothed(args.model, device)
    tic = time.perf_counter()
    if args.command == "certify":
        section = CertifyConfig(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size)
        files, rows = certify_folder(model, args.images, section, seed=args.seed, device=device)
    else:
        files, rows = predict_folder(model, args.images, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                                     seed=args.seed, device=device)
    table = format_rows(files, rows, args.images, model.classes, radius=args.command == "certify")
    if args.out is None:
        print(table, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    labelled = [r for r in rows if r.label >= 0]
    accuracy = f", {sum(r.correct for r in labelled)}/{len(labelled)} correct" if labelled else ""
    print(f"{args.command}: {len(rows)} images under sigma={model.sigma} with n={args.n}, alpha={args.alpha}: "
          f"{sum(r.predict < 0 for r in rows)} abstained{accuracy}; {time.perf_counter() - tic:.1f}s"
          f"{f'; rows in {args.out}' if args.out else ''}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("predict", "certify", "export"):
            return _export(args) if args.command == "export" else _smooth(args)
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
        return _run(args, cfg)
    except ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the shell's code of a SIGTERM death, after the cleanup below


@contextlib.contextmanager
def _stopped_cleanly(out: Path) -> Iterator[None]:
    """A run stopped by Ctrl-C or SIGTERM (a scheduler, `kill`, `timeout`) removes the unfinished folder it was
    writing into (`run_experiment` writes ``.<out>.partial-*`` beside `out` and renames it when done); SIGTERM is
    turned into SystemExit for the time of the run, so that this cleanup runs. A run that fails with an error
    keeps that folder for inspection, as before."""
    before = set(out.parent.glob(f".{out.name}.partial-*"))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        for folder in set(out.parent.glob(f".{out.name}.partial-*")) - before:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, SystemExit) and err.code == 128 + signal.SIGTERM:
            print(f"decrop run: stopped by SIGTERM; its unfinished output was removed ({out} was not written)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """`run`: the checks that need no data (profile, output folder, device), then the experiment."""
    if args.config is None:
        raise ConfigError(f"run needs --config PROFILE: {PROFILES}; the built-in defaults alone are no profile "
                          f"(600 epochs, n=10000: hours on a CPU)")
    out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output(out)
    from .bounds import max_certifiable_radius  # scipy: only once the config is valid
    from .pipeline import format_table, run_experiment
    from .runtime import resolve_device

    resolve_device(cfg.device)  # 'cuda' without a GPU fails here, not after the data is loaded
    print(f"decrop run: writing to {out}", flush=True)
    tic = time.perf_counter()
    with _stopped_cleanly(out):
        table = run_experiment(cfg, out)
    data = (f"{cfg.data.percent}% of {cfg.data.dataset} training data" if cfg.data.dataset != "folder"
            else f"the images of {cfg.data.root}/train")
    print(f"\nCertified accuracy (%) under sigma={cfg.sigma}, {data}, n={cfg.certify.n}, "
          f"alpha={cfg.certify.alpha}:")
    print(format_table(table))
    limit = max_certifiable_radius(cfg.certify.n, cfg.certify.alpha, cfg.sigma)
    if limit < max(cfg.certify.radii):
        print(f"(with n={cfg.certify.n} and alpha={cfg.certify.alpha} no radius above {limit:.3f} can be "
              f"certified: raise certify.n to report larger radii)")
    print(f"\nwall time {time.perf_counter() - tic:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
