import sys

from safemerge.cli import main

sys.exit(main())
