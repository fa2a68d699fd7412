"""Allow ``python -m mixgrpo``."""

from .cli import main

main()
