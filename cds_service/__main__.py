"""`python -m cds_service`, and the file `spark-submit` is given: absolute imports, so it also runs as a script."""
import sys

from cds_service.cli import main

sys.exit(main())
