"""``python -m para_fx explain ...``: see :mod:`para_fx.inspect.cli`."""

from .inspect.cli import main

raise SystemExit(main())
