"""``python -m kdfast.train``: the command line of a distillation run.

This module parses the command line with the standard library alone and imports torch, the models and the
data only afterwards (:mod:`kdfast.train.loop`), so ``--help`` and a mistyped flag answer at once. The
loop itself, its stages and outputs live in :mod:`kdfast.train.loop`; the checks every input passes before
the output folder is touched in :mod:`kdfast.train.preflight`; the output-folder rules in
:mod:`kdfast.train.rundir`. Names of the loop (``distill_step``, ``lr_factor``, ...) are importable from
here too; they load torch on first use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from kdfast.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
    one_line,
    os_error_advice,
    shown_path,
    stop_signal,
    terminate_like_ctrl_c,
)

DESCRIPTION = """\
Distill a small student from a large teacher. A run trains the teacher (or loads it from
teacher.weights), trains a baseline student on the labels alone, then distills the same student with
the methods that loss.method names, and writes checkpoints, metrics, pictures and a results table to
its output folder. Without arguments it runs the embedded default (configs/default.yaml): scikit-learn's
bundled digits, a small hybrid CNN + ViT teacher and a small CNN student distilled with KD + AGKD, a few
minutes on 2 CPU cores.

Before anything is written, every input is checked: each config key, the data (at least 2 classes and
2 training images), the taps, the image size against the models, one probe training step of every
stage with the whole loss (forward and backward, then undone) and, with --resume, the saved state.
A bad input ends the command with one line that names it, exit code 2.

A new run never replaces an earlier one: when the output folder already holds a run, this run writes
to the first free numbered folder beside it (runs/default-2, runs/default-3, ...) and says so;
--overwrite replaces the earlier run instead. With --seeds, the whole run repeats once per seed in
DIR/seed<S>/ and DIR/results.md holds the mean and std over the seeds; DIR follows the same rules. A run
saves its state after every epoch; after Ctrl-C, SIGTERM or a kill, --resume DIR continues from the last
finished epoch and ends where an uninterrupted run ends. On --resume, --set may raise (or lower) the epochs
of a stage to continue it, and change the learning rate, runtime.grad_clip, runtime.amp and how the run
runs (runtime.*, data.num_workers, data.eval_batch_size); config.yaml records each change and the epochs
it took effect after. Every other key would change what has been trained and is refused."""

EPILOG = """\
exit codes:
  0    done
  1    training diverged (a NaN or infinite loss); the last good state is kept
  2    bad usage or input, or a file that cannot be written (a full disk, no permission): one
       line names what to change; every finished epoch is kept
  130  interrupted (Ctrl-C); the run continues with --resume DIR
  143  stopped by SIGTERM (kill, timeout, a job scheduler); the run continues with --resume DIR

examples:
  python -m kdfast.train
  python -m kdfast.train --config configs/mtd_digits.yaml --set student.train.epochs=5
  python -m kdfast.train --config configs/kd_digits.yaml --seeds 0,1,2
  python -m kdfast.train --resume runs/default
  python -m kdfast.train --qad runs/default/student.pt --set qad.epochs=3"""

QAD_SETTINGS = "qad.yaml"  # a folder holding it is a QAD run (kdfast.train.qad), which --resume continues


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one UsageError line instead of usage text + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m kdfast.train``; runtime flags may equally come through ``--set``."""
    parser = _ArgumentParser(
        prog="python -m kdfast.train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML run config (default: configs/default.yaml, the digits run)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, the value read as YAML, e.g. --set data.batch_size=32 (repeatable)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: the config's 'out', runs/default); if it holds a run: DIR-2, DIR-3...",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the output folder instead of writing to a fresh numbered folder",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last finished epoch (reads DIR/config.yaml, records --set)",
    )
    parser.add_argument(
        "--compile", choices=("auto", "on", "off"), help="torch.compile the training step (runtime.compile)"
    )
    parser.add_argument(
        "--qad",
        metavar="STUDENT",
        help="quantization-aware distillation: fine-tune STUDENT (a student.pt) with fake-quantized weights "
        "and activations, taught by its fp32 self; writes <its folder>/qad/ (settings: --set qad.KEY=VALUE)",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="S,S,...",
        help="repeat the whole run once per seed in DIR/seed<S>/ and report mean +- std (e.g. 0,1,2)",
    )
    args = parser.parse_args(argv)
    if args.qad is not None and args.resume is not None:
        raise UsageError("--resume DIR continues a QAD run from DIR's qad.yaml: drop --qad")
    if args.resume is not None and (args.config is not None or args.out is not None or args.overwrite):
        raise UsageError(
            "--resume DIR takes its config and output folder from DIR: drop --config / --out / --overwrite"
        )
    return args


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes comma-separated integers such as 0,1,2, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m kdfast.train``: exit 0 when done, 1 when training diverged, 2 on bad usage or input,
    130 when interrupted by Ctrl-C, 143 by SIGTERM. Every error is one line on stderr."""
    with terminate_like_ctrl_c():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(argv)
        if args.qad is not None or (args.resume is not None and Path(args.resume, QAD_SETTINGS).is_file()):
            from kdfast.train.qad import qad_command

            qad_command(args)
        else:
            from kdfast.train.loop import train_command  # torch, the models and the data load only now

            train_command(args)
    except UsageError as exc:
        _say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        _say(str(exc))
        return EXIT_GATE_FAILED
    except TrainingInterrupted as exc:
        _say(str(exc))
        return exc.code
    except KeyboardInterrupt as exc:
        what, code = stop_signal(exc)
        _say(f"stopped by {what} before the run started; nothing was written")
        return code
    except BrokenPipeError:  # stdout closed by its reader (``| head``): the run stopped at that print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        print(
            "kdfast.train: stopped: the reader of the output closed it (e.g. `| head`); continue with "
            "--resume DIR, or send the output to a file",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file that vanished mid-run; writes fail as WriteError (kdfast.atomic)
        where = f" {shown_path(exc.filename)}" if exc.filename else ""
        _say(
            f"error: cannot use{where}: {os_error_advice(exc)}; then run again, or continue with --resume DIR"
        )
        return EXIT_BAD_INPUT
    return EXIT_OK


def _say(message: str) -> None:
    print(f"kdfast.train: {one_line(message)}", file=sys.stderr)


def __getattr__(name: str) -> Any:
    """``from kdfast.train import distill_step`` (or any name of the loop) imports :mod:`kdfast.train.loop`
    on first use, so this module stays free of torch until a run needs it."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("kdfast.train.loop"), name)
