"""`python -m medjax.cli ...` runs the `medjax` command."""

import sys

from medjax.cli.main import main

sys.exit(main())
