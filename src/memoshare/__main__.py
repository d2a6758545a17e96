"""``python -m memoshare`` runs the ``memoshare`` command."""

from .cli import main

raise SystemExit(main())
