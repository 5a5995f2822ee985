"""``python -m opals_dsl`` is the ``opf`` command."""

from .cli import main

raise SystemExit(main())
