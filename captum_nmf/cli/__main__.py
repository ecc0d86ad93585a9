"""``python -m captum_nmf.cli``: the ``captum-nmf`` command."""

from captum_nmf.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
