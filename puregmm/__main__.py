"""``python -m puregmm``: the same as the ``puregmm`` command (see :mod:`puregmm.cli`)."""

from puregmm.cli import main

raise SystemExit(main())
