"""``python -m tenantry``: the same as the ``tenantry`` command."""

from tenantry.cli import main

if __name__ == "__main__":
    main()
