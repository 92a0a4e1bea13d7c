import sys

from stsmilter.cli import main

sys.exit(main())
