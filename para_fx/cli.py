"""``python -m para_fx explain``: what the para backend would do to a model on a given mesh.

    python -m para_fx explain MODULE:FACTORY --world-size 4 --ulysses 2 --ring 2 [--cache 0.08] [--html out.html]
    python -m para_fx explain --example flux --world-size 2

``FACTORY`` (a function in ``MODULE``, an importable module or a ``.py`` file) takes no arguments
and returns ``(model, kwargs)`` for ``model(**kwargs)``; ``--example`` picks one of the tiny
random diffusers transformers of :mod:`para_fx.zoo`. The mesh is simulated in this process
(:func:`para_fx.explain` with ``world_size``), so no GPU or launcher is needed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pathlib
import sys
from typing import Any, Callable

from . import zoo
from .explain import explain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m para_fx", description="Inspect what para-fx does to a model.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("explain", help="print the report of one call of a model through the para backend")
    ex.add_argument("target", nargs="?", help="MODULE:FACTORY, FACTORY returning (model, kwargs)")
    ex.add_argument("--example", choices=sorted(zoo.FACTORIES), help="a built-in tiny model instead of MODULE:FACTORY")
    ex.add_argument("--world-size", type=int, default=1, help="ranks to simulate (default 1: one device)")
    ex.add_argument("--ulysses", type=int, help="Ulysses degree (default: the world size / ring / batch)")
    ex.add_argument("--ring", type=int, help="Ring degree")
    ex.add_argument("--batch", type=int, default=1, help="batch (CFG) degree")
    ex.add_argument("--rank", type=int, default=0, help="the rank whose view is reported (default 0)")
    ex.add_argument("--cache", type=float, metavar="THRESHOLD", help="add a First Block Cache with this threshold")
    ex.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    ex.add_argument("-v", "--verbose", action="store_true", help="log what the backend does (the para_fx logger)")
    args = parser.parse_args(argv)
    if (args.target is None) == (args.example is None):
        parser.error("explain: give either MODULE:FACTORY or --example NAME")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    factory = zoo.FACTORIES[args.example] if args.example else load_factory(args.target)
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], dict)):
        parser.error(f"explain: {args.target or args.example} must return (model, kwargs), got {type(made).__name__}")
    model, kwargs = made
    cache = None
    if args.cache is not None:
        from .cache import FirstBlockCache

        cache = FirstBlockCache(threshold=args.cache)
    report = explain(
        model,
        kwargs=kwargs,
        cache=cache,
        world_size=args.world_size,
        ulysses=args.ulysses,
        ring=args.ring,
        batch=args.batch,
        rank=args.rank,
    )
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
    module = importlib.import_module(module_name)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"explain: {module_name} has no function {name!r}")
    return factory
