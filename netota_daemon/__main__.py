import sys

from netota_daemon.cli.main import main

sys.exit(main())
