"""Config files checked before Snakemake reads them: a missing file, a YAML syntax error, a file
that is not a mapping stop with one message naming the file (and line and column), no traceback.

Snakemake 9.27 reads `--configfile` in its command-line layer (snakemake/settings/types.py,
ConfigSettings.__post_init__), before the Snakefile runs: a missing file there is a raw
FileNotFoundError traceback and a YAML error a message naming neither file nor line. So the
check runs before Snakemake: `python tools/run.py ...` (what the Makefile uses) and, for the
default config.yaml read by the Snakefile's `configfile:` directive, the Snakefile itself.

    python tools/configcheck.py FILE...      # check only; exit status 1 on the first bad file
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import yaml

PRESETS = Path(__file__).resolve().parents[1] / "config"


class ConfigFileError(ValueError):
    """A config file that Snakemake could not read; the message names the file."""


def _not_found(path: Path) -> ConfigFileError:
    presets = ", ".join(f"config/{p.name}" for p in sorted(PRESETS.glob("*.yaml")))
    return ConfigFileError(f"config file {str(path)!r} not found"
                           + (f" (presets: {presets})" if presets else ""))


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigFileError:
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark:
        context += f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
    snippet = mark.get_snippet() if mark else None
    return ConfigFileError(f"config file {str(path)!r}{where}: YAML syntax error: {problem}"
                           + (f" ({context})" if context else "")
                           + (f"\n{snippet}" if snippet else ""))


def check_configfile(path: str | Path) -> dict:
    """The config file's content, or ConfigFileError naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise _not_found(path)
    if path.is_dir():
        raise ConfigFileError(f"config file {str(path)!r} is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config file {str(path)!r} is not UTF-8 text "
                              f"(byte {exc.object[exc.start]:#04x} at offset {exc.start})")
    except OSError as exc:
        raise ConfigFileError(f"config file {str(path)!r} cannot be read: {exc.strerror}")
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if content is None:
        raise ConfigFileError(f"config file {str(path)!r} is empty")
    if not isinstance(content, dict):
        raise ConfigFileError(f"config file {str(path)!r} must hold `key: value` pairs at top "
                              f"level, not a {type(content).__name__}")
    return content


def exit_if_bad(path: str | Path) -> None:
    """For the Snakefile: print the message and exit with status 1 (an exception raised there
    would be printed with traceback lines of the Snakefile and this module)."""
    try:
        check_configfile(path)
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def configfiles_in(argv: list[str]) -> list[str]:
    """The config files a Snakemake command line names (--configfile/--configfiles), read with
    Snakemake's own argument parser; none when it would print help or a usage error itself."""
    from snakemake.cli import get_argument_parser
    parser = get_argument_parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, _ = parser.parse_known_args(argv)
    except SystemExit:
        return []
    return [str(p) for p in args.configfile or []]


def check_all(paths) -> list[str]:
    """One message per bad config file."""
    errors = []
    for path in paths:
        try:
            check_configfile(path)
        except ConfigFileError as exc:
            errors.append(str(exc))
    return errors


def main(argv: list[str] | None = None) -> int:
    errors = check_all(sys.argv[1:] if argv is None else argv)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
