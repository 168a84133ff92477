import sys

from fdistill.apps.cli import main

sys.exit(main())
