"""One module per command; importing this package registers them all on `twotower_cli.cli.app`."""

from twotower_cli.commands import (
    bench,  # noqa: F401
    chat,  # noqa: F401
    env,  # noqa: F401
    eval,  # noqa: F401
    generate,  # noqa: F401
    inspect,  # noqa: F401
    serve,  # noqa: F401
    split,  # noqa: F401
    tokenize,  # noqa: F401
    train,  # noqa: F401
)
