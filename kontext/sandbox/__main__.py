import sys

from kontext.sandbox.runner import main

sys.exit(main())
