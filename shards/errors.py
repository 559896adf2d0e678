"""The one base class of user-facing errors, and how every CLI reports them.

Every error that is the user's input's fault (a file, a value, an argument, a cluster address, a recipe whose loss
diverges) derives from `UserError`; each CLI catches `UserError` alone, in one place (`report`), prints its message
on one line and exits with its `exit_status` (2, as argparse, unless a subclass documents another), and its
argument parser (`Parser`) does the same for a bad argument. Anything else that escapes is a bug in cavmae and
keeps its traceback. A per-sample defect (`shards.schema.BadSample`) is not a `UserError`: readers count and skip it.
"""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2  # the exit status of a user error (unless its class says another), as argparse's


class UserError(ValueError):
    """A bad input the user can fix; the message is one line and names the file, key or argument."""

    exit_status = USAGE_ERROR


class NoSamples(UserError):
    """Shards from which no sample decodes (one line, naming the shards): every reading command stops with it
    (exit 2) rather than train, evaluate or write nothing."""
class NotFound(UserError):
    """A named input that is not there: no shard matches a spec, a folder is not a shard folder."""


class NotRegular(UserError):
    """A shard that is not a regular file (a FIFO, device or socket named like one): refused before any reader
    opens it, as a FIFO would block its reader forever and a device stream without end."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line; for one raised in a DataLoader worker (which torch re-raises with the
    worker's traceback as its text), the original message: the last line without its "module.Type: " prefix."""
    text = str(exc)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = type(exc).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return " ".join(text.split()) or type(exc).__name__


def report(prog: str, exc: UserError) -> int:
    """Print `exc` as the one line "prog: error: ..." on stderr; its exit status."""
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return exc.exit_status


def examples_for(examples: str, command: str) -> str:
    """The entries of a CLI's `examples:` block that run `command` (the word after one naming cavmae: `cavmae-prep
    ingest`, `-m cavmae.train pretrain`), with their continuation lines: a subcommand's --help shows its own
    examples, the CLI's --help all of them."""
    head, *lines = examples.splitlines()
    entries: list[list[str]] = []
    for line in lines:
        if line.startswith("   ") and entries:  # a continued entry (after a trailing backslash)
            entries[-1].append(line)
        elif line.strip():
            entries.append([line])
    words = [entry[0].split() for entry in entries]
    mine = [entry for entry, w in zip(entries, words)
            if any(word == command and "cavmae" in before for before, word in zip(w, w[1:]))]
    return "\n".join([head, *(line for entry in mine for line in entry)]) + "\n" if mine else ""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error (argparse prints the usage
    too); `--help` still shows it. Its subcommand parsers are of this class too.

    The options named in `dash_values` take a value that may start with '-' as their next word (YouTube ids do:
    `--key -PJHxphWEs`), as `--key=-PJHxphWEs` always could: argparse reads such a word as an unknown option and
    says the option has no value. A next word that is one of this parser's options (`--key --out x.png`) or `--`
    is left to argparse (the value is missing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dash_values: set[str] = set()

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        joined, i = [], 0
        while i < len(args):
            word = args[i]
            if word == "--":
                joined += args[i:]
                break
            if word in self.dash_values and i + 1 < len(args) and args[i + 1] != "--" \
                    and args[i + 1] not in self._option_string_actions:
                joined.append(f"{word}={args[i + 1]}")
                i += 2
                continue
            joined.append(word)
            i += 1
        return super().parse_known_args(joined, namespace)

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
