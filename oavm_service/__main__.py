import sys

from oavm_service.cli import main

sys.exit(main())
