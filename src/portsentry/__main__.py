"""`python -m portsentry` runs the command line."""

from portsentry.cli.main import main

raise SystemExit(main())
