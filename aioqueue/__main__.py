from .cli.console import main

raise SystemExit(main(prog="python -m aioqueue"))
