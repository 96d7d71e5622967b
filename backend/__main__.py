import sys

from avface.cli import main

sys.exit(main())
