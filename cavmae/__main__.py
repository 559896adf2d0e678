import sys

from cavmae.cli import main

sys.exit(main())
