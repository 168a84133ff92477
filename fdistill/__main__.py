import sys

from fdistill.cli import main

sys.exit(main())
