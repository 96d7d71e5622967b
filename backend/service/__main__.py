"""``python -m avface.service CMD ...`` is ``avface CMD ...`` (serve, submit, jobs, fetch,
cancel, keys, bench-service)."""
import sys

from avface.cli import main

sys.exit(main())
