"""typer's rich --help on the versions lgd supports: a flag shows no value placeholder.

typer 0.29's rich help prints a type placeholder for every option, flags included
(`--no-lgd <bool>`), though a flag takes no value (`--no-lgd true` is refused as an extra
argument); its plain help, like click's, leaves it out for flags and counters
(TyperOption.get_help_record). `apply()` makes the rich help follow the same rule.
"""
from __future__ import annotations

import typer.core


def apply() -> None:
    option = typer.core.TyperOption
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "lgd_flags_bare", False):
        return  # an older typer renders flags through click, which shows no placeholder

    def display_type_rich(self, ctx):
        if self.metavar is None and (self.is_flag or self.count):
            return None
        return original(self, ctx)

    display_type_rich.lgd_flags_bare = True
    option.display_type_rich = display_type_rich
