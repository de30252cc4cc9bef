import sys

from projections.cli import main

sys.exit(main())
