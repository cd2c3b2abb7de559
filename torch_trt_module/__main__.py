"""``python -m torch_trt_module``: the command line (see :mod:`torch_trt_module.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
