#!/usr/bin/env python
"""Entry point: ``python cli.py --help`` (same as the ``automl-ad`` console script)."""

from automl_ad.cli import main

if __name__ == "__main__":
    main()
