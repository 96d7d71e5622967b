"""``python -m avface.bench ARGS`` is ``avface bench ARGS``: one entry point, one place that
sets up logging and turns errors into exit codes."""
import sys

from avface.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
