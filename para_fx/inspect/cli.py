"""``python -m para_fx explain``: what the para backend would do to a model on a given mesh.

    python -m para_fx explain MODULE:FACTORY --world-size 4 --ulysses 2 --ring 2 [--cache 0.08] [--html out.html]
    python -m para_fx explain --example flux --ulysses 2          # the world size follows from the degrees

``FACTORY`` (a function in ``MODULE``, an importable module or a ``.py`` file) takes no arguments
and returns ``(model, kwargs)`` for ``model(**kwargs)``; ``--example`` picks one of the tiny
random diffusers transformers of :mod:`para_fx.testing.zoo`. The mesh is simulated in this process
(:func:`para_fx.explain` with ``world_size``), so no GPU or launcher is needed.

Errors are one line, and are found before the model is built where the arguments alone show them
(degrees that do not fit the world size, a negative threshold); ``-v`` adds the traceback of an
error raised while building or running the model.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pathlib
import sys
from typing import Any, Callable

from ..testing import zoo
from .explain import explain
from ..core.mesh import mesh_degrees


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, pointing to ``--help`` instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the threshold must be >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m para_fx", description="Inspect what para-fx does to a model.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("explain", help="print the report of one call of a model through the para backend")
    ex.add_argument("target", nargs="?", help="MODULE:FACTORY, FACTORY returning (model, kwargs)")
    ex.add_argument("--example", choices=sorted(zoo.FACTORIES), help="a built-in tiny model instead of MODULE:FACTORY")
    ex.add_argument("--world-size", type=_positive, help="ranks to simulate (default: batch x ring x ulysses, 1 without degrees)")
    ex.add_argument("--ulysses", type=_positive, help="Ulysses degree (default: the world size / ring / batch)")
    ex.add_argument("--ring", type=_positive, help="Ring degree")
    ex.add_argument("--batch", type=_positive, default=1, help="batch (CFG) degree")
    ex.add_argument("--rank", type=int, default=0, help="the rank whose view is reported (default 0)")
    ex.add_argument("--cache", type=_threshold, metavar="THRESHOLD", help="add a First Block Cache with this threshold")
    ex.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    ex.add_argument("-v", "--verbose", action="store_true", help="log what the backend does; tracebacks on errors")
    args = parser.parse_args(argv)
    if (args.target is None) == (args.example is None):
        ex.error("give either MODULE:FACTORY or --example NAME")
    world = args.world_size or args.batch * (args.ring or 1) * (args.ulysses or 1)
    try:
        mesh_degrees(world, args.ulysses, args.ring, args.batch)
    except ValueError as e:
        ex.error(str(e).removeprefix("init_mesh: "))
    if not 0 <= args.rank < world:
        ex.error(f"--rank {args.rank} is not in [0, {world}) for a world of {world}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    factory = zoo.FACTORIES[args.example] if args.example else load_factory(args.target)
    name = args.target or args.example
    try:
        made = factory()
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict)):
            ex.error(f"{name} must return (model, kwargs), got {type(made).__name__}")
        model, kwargs = made
        cache = None
        if args.cache is not None:
            from ..core.cache import FirstBlockCache

            cache = FirstBlockCache(threshold=args.cache)
        report = explain(
            model, kwargs=kwargs, cache=cache, world_size=world,
            ulysses=args.ulysses, ring=args.ring, batch=args.batch, rank=args.rank,
        )
    except Exception as e:  # the model's own code or the backend: one line unless -v asks for the traceback
        if args.verbose:
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"explain {name}: {type(e).__name__}: {first_line} (-v for the traceback)") from None
    print(report)
    if args.html:
        report.save_html(args.html)
        print(f"wrote {args.html}")
    return 0


def load_factory(target: str) -> Callable[[], Any]:
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    module_name, sep, name = target.rpartition(":")
    if not sep or not module_name or not name:
        raise SystemExit(f"explain: expected MODULE:FACTORY, got {target!r}")
    if module_name.endswith(".py"):  # a file: import it by name from its folder, siblings importable too
        path = pathlib.Path(module_name).resolve()
        if not path.is_file():
            raise SystemExit(f"explain: no file {module_name}")
        folder, module_name = str(path.parent), path.stem
    else:  # like `python -m`: modules in the working directory are importable
        folder = ""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"explain: cannot import {module_name!r} ({e}); run from the folder that holds it, or give path/to/file.py:{name}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"explain: {module_name} has no function {name!r}")
    return factory
