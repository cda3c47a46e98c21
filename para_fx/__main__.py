"""``python -m para_fx explain ...``: see :mod:`para_fx.cli`."""

from .cli import main

raise SystemExit(main())
