"""`python -m profiler` is `gpuscope`."""
import sys

from gpuscope.commands.app import main

sys.exit(main())
