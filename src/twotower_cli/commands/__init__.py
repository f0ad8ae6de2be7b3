"""One module per command; importing this package registers them all on `twotower_cli.cli.app`."""

from twotower_cli.commands import generate  # noqa: F401
from twotower_cli.commands import bench  # noqa: F401
from twotower_cli.commands import inspect  # noqa: F401
from twotower_cli.commands import split  # noqa: F401
from twotower_cli.commands import train  # noqa: F401
