"""``python -m exlab_wizard``: the same command line as ``exlab-sync``."""

from exlab_wizard.cli import main

if __name__ == "__main__":
    main(prog_name="exlab-sync")
