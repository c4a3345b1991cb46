"""absl flags for the ``python -m`` command lines (``generate``, ``convert``).

Each command defines its flags on its own ``flags.FlagValues`` (not absl's global ``FLAGS``,
so two commands imported into one process do not clash) and parses with :func:`parse`, which
starts every call from the defaults, so ``main(argv)`` can run several times in one process.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from absl import flags


class UsageError(Exception):
    """A bad command line: reported with a pointer to ``--help``, exit code 2."""


def define_help(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("help", False, "show this help and exit", short_name="h", flag_values=fv)


def wants_help(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help before any ``--``."""
    return any(a in ("-h", "--help", "-help") for a in argv[:argv.index("--") if "--" in argv else None])


def flag_help(fv: flags.FlagValues) -> str:
    """absl's help for ``fv``'s flags, without its module-name header lines."""
    return "\n".join(ln for ln in fv.get_help(include_special_flags=False).splitlines() if ln.startswith(" "))


def parse(fv: flags.FlagValues, prog: str, argv: list[str]) -> tuple[list[str], SimpleNamespace, set[str]]:
    """``(positional arguments, flag values, names of the flags given)``; raises :class:`UsageError`."""
    fv.unparse_flags()
    try:
        rest = fv([prog, *argv])[1:]
        values = SimpleNamespace(**fv.flag_values_dict())
        given = {name for name in fv if fv[name].present and name == fv[name].name}
    except flags.Error as e:
        raise UsageError(str(e)) from None
    finally:
        fv.unparse_flags()
    return rest, values, given


def report(prog: str, e: UsageError) -> int:
    """Prints a usage error to stderr; returns the exit code 2."""
    print(f"{prog}: error: {e}\nTry '{prog} --help' for the flags.", file=sys.stderr)
    return 2
