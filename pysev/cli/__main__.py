import sys

from pysev.cli import main

sys.exit(main())
