"""``--help`` of the ``export``, ``weights`` and ``transfer`` commands: every option with its
default and one line of help (shared by :mod:`cemnet.weights` and :mod:`cemnet.transferability`)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written and appends ``(default: X)`` to every option's help,
    unless the help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options of ``parser`` and its sub-commands without a line of help (what a test asserts empty)."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                missing += undocumented_options(sub)
        elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing
