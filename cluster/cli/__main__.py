"""`python -m cluster.cli ...`: the `dip` command where its console script is not on PATH (manifests)."""
import sys

from cluster.cli.main import main

sys.exit(main())
