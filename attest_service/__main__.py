"""``python -m attest_service``: the same entry point as the ``attest-service`` console script."""

from attest_service.cli import main

raise SystemExit(main())
