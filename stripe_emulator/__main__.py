"""``python -m stripe_emulator``: serve the emulator (see :func:`stripe_emulator.cli.main`)."""

from stripe_emulator.cli import main

raise SystemExit(main())
