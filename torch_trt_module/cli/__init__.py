"""The command line: ``python -m torch_trt_module`` or ``torch-trt-module``.

Subcommands: ``build``, ``inspect``, ``verify``, ``bench``, ``doctor``, ``cache list|info|clear|prune``
and ``export-triton``. MODEL is an ``.onnx`` file or ``package.module:factory``. The commands
are in ``_commands.py``, what they read in ``_inputs.py``, what they print in ``_reports.py``.

Exit codes: 0 ok; 1 the command ran and failed (verification failed, or an export,
build or run failed); 2 usage error (bad arguments, bad model spec, missing file).
Errors are one line on stderr; ``--verbose`` adds the traceback and debug logs.

Example:
    $ python -m torch_trt_module build torchvision.models:resnet18 -o r18.ttm \\
          --shapes x:1x3x224x224,8x3x224x224,32x3x224x224 --target sm86,sm89
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Iterator, Sequence

from .._errors import InputError, SettingsError, TorchTRTError, UsageError
from ._commands import (cmd_bench, cmd_build, cmd_cache, cmd_doctor, cmd_explain, cmd_export_triton, cmd_inspect,
                        cmd_verify)

__all__ = ["main"]

PROG = "torch-trt-module"
VERBOSE_ENV = "TORCH_TRT_MODULE_VERBOSE"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> _Parser:
    common = _Parser(add_help=False)  # accepted before and after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logs, TensorRT's verbose log, tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    common.add_argument("--cache-dir", default=argparse.SUPPRESS,
                        help="engine cache (default: $TORCH_TRT_MODULE_CACHE, else ~/.cache/torch_trt_module)")
    model = _Parser(add_help=False)
    model.add_argument("model", metavar="MODEL", help="an .onnx file or package.module:factory")
    model.add_argument("--shapes", action="append", default=[], metavar="NAME:MIN,OPT,MAX",
                       help="trtexec style, e.g. x:1x3x224x224,8x3x224x224,32x3x224x224 (repeat per input)")
    model.add_argument("--dtype", action="append", default=[], metavar="[NAME:]DTYPE",
                       help="input dtype of a factory model (default float32), e.g. int64 or input_ids:int64")
    model.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    model.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt_rtx", "onnxruntime"))
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    model.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    build = _Parser(add_help=False)
    build.add_argument("--target", help="TensorRT-RTX compute capabilities to build for, e.g. sm86,sm89")
    build.add_argument("--workspace", help="builder workspace limit, e.g. 1G")
    build.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level 0..5")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    c = sub.add_parser("build", parents=[common, model, build], help="build an engine file")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="engine file to write")
    c.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the export")
    c.set_defaults(func=cmd_build)
    c = sub.add_parser("inspect", parents=[common], help="show an engine, saved module or ONNX file")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_inspect)
    c = sub.add_parser("verify", parents=[common, model], help="parity report at the profile's min, opt, max")
    c.add_argument("--rtol", type=float)
    c.add_argument("--atol", type=float)
    c.add_argument("--no-cache", action="store_true", help="do not use the engine cache")
    c.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    c.set_defaults(func=cmd_verify)
    c = sub.add_parser("bench", parents=[common, model], help="latency table across backends and batch sizes")
    c.add_argument("--batch-sizes", help="e.g. 1,8,32 (default: the batch sizes of --shapes)")
    c.add_argument("--backends", default="eager,onnxruntime,onnxruntime-cuda,trtmodule",
                   help="comma-separated: eager, torch.compile, onnxruntime, onnxruntime-cuda, trtmodule, "
                        "trtmodule-tensorrt, trtmodule-tensorrt_rtx, trtmodule-onnxruntime")
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--iters", type=int, default=30)
    c.add_argument("--max-seconds", type=float, default=10.0, help="time budget per cell (at least 5 calls)")
    c.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    c.set_defaults(func=cmd_bench)
    cache = sub.add_parser("cache", parents=[common], help="engine cache: list, info, clear, prune")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True, parser_class=_Parser)
    c = csub.add_parser("list", parents=[common], help="entries, least recently used first")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("info", parents=[common], help="one entry in full; without KEY_PREFIX, the cache's counts "
                        "(builds, local and remote hits, bytes moved, lease waits) and its remote store")
    c.add_argument("key", metavar="KEY_PREFIX", nargs="?")
    c.add_argument("--json", action="store_true")
    csub.add_parser("clear", parents=[common], help="remove every entry")
    c = csub.add_parser("prune", parents=[common], help="evict LRU entries down to a size")
    c.add_argument("--max-size", help="e.g. 500M or 2G (default: the cache's cap)")
    cache.set_defaults(func=cmd_cache)
    c = sub.add_parser("export-triton", parents=[common, model, build],
                       help="write a Triton model repository from an engine file or a model")
    c.add_argument("repo_dir", metavar="REPO_DIR")
    c.add_argument("model_name", metavar="NAME", nargs="?", help="Triton model name (default: from MODEL)")
    c.add_argument("--name", help="the same as NAME")
    c.add_argument("--version", type=int, default=1, help="the version directory to write (default 1)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing version directory and a config that differs")
    c.add_argument("--max-batch-size", type=int)
    c.add_argument("--no-dynamic-batching", action="store_true")
    c.add_argument("--instance-count", type=int, default=1)
    c.set_defaults(func=cmd_export_triton)
    c = sub.add_parser("explain", parents=[common, model],
                       help="what compile() would do: one graph and the parser's verdict (and its split into "
                            "engines and PyTorch), or the graph breaks")
    c.add_argument("--min-block-size", type=int, help="the fewest ops an engine part may have (default 5)")
    c.add_argument("--torch-executed-ops", help="ATen ops kept in PyTorch, comma-separated (aten.gelu,aten.sub.Tensor)")
    c.set_defaults(func=cmd_explain)
    c = sub.add_parser("doctor", parents=[common], help="what runs here, and a smoke test of each backend")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--no-smoke", action="store_true", help="only report; build and run nothing")
    c.set_defaults(func=cmd_doctor)
    return p


# --------------------------------------------------------------------------- main

@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Our loggers to stderr for the length of one command; everything is restored afterwards."""
    logger = logging.getLogger("torch_trt_module")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(levelname)s{' %(name)s' if verbose else ''}: %(message)s"))
    saved = (logger.level, logger.propagate, os.environ.get(VERBOSE_ENV))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # TensorRT's VERBOSE messages reach the log
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")  # library deprecation noise is not the user's business
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if saved[2] is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = saved[2]


def _exit_code(e: BaseException) -> int:
    return 2 if isinstance(e, (UsageError, SettingsError, InputError, FileNotFoundError)) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    args.verbose = getattr(args, "verbose", False)
    args.cache_dir = getattr(args, "cache_dir", None)
    with _logging(args.verbose, getattr(args, "quiet", False)):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit code
            if args.verbose:
                traceback.print_exc()
            code = _exit_code(e)
            msg = str(e) if isinstance(e, (TorchTRTError, OSError)) else f"{type(e).__name__}: {e}"
            hint = "" if args.verbose or code == 2 else " (run with --verbose for details)"
            print(f"{PROG} {args.command}: error: {msg}{hint}", file=sys.stderr)
            return code
