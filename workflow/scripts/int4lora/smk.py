"""The thin bridge between a rule's `snakemake` object and a script's `main()`.

`run(snakemake, main)` calls main with the arguments it names, looked up by name among the rule's
params, named inputs, named outputs and wildcards (in that order); besides these, `output` is the
rule's only output, `inputs` the list of all inputs, `log_path` its log and `config` the whole
config. A name found nowhere is an error naming it, so rules and scripts cannot drift apart.
"""
from __future__ import annotations

import inspect
import signal
import traceback

from .logcapture import fd_redirect

MISSING = object()


def _lookup(snakemake, name: str):
    for source in (snakemake.params, snakemake.input, snakemake.output, snakemake.wildcards):
        if name in source.keys():
            return getattr(source, name)
    special = {"output": lambda: snakemake.output[0], "inputs": lambda: list(snakemake.input),
               "log_path": lambda: snakemake.log[0] if len(snakemake.log) else None,
               "config": lambda: snakemake.config}
    if name in special:
        return special[name]()
    return MISSING


def bind(snakemake, main) -> dict:
    kwargs, missing = {}, []
    for name, param in inspect.signature(main).parameters.items():
        value = _lookup(snakemake, name)
        if value is not MISSING:
            kwargs[name] = value
        elif param.default is inspect.Parameter.empty:
            missing.append(name)
    if missing:
        raise TypeError(f"rule {snakemake.rule}: no param/input/output/wildcard named "
                        f"{', '.join(missing)} for {main.__module__}.main()")
    return kwargs


def terminate_as_exit(signum, _frame):
    """SIGTERM (Snakemake's or a cluster's cancel) unwinds like Ctrl-C: `finally` blocks run, so an
    engine shuts its worker processes down, and the atomic writers leave nothing half-written."""
    raise SystemExit(128 + signum)


def run(snakemake, main):
    from . import resultio
    resultio.RECORD_ERRORS = bool(snakemake.config.get("record_errors", False))
    signal.signal(signal.SIGTERM, terminate_as_exit)
    # a shell without job control starts background commands with SIGINT ignored (nohup ... &,
    # as a detached GPU session is started), and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = snakemake.log[0] if len(snakemake.log) else None
    with fd_redirect(log):
        try:
            return main(**bind(snakemake, main))
        except BaseException:
            traceback.print_exc()  # into the rule's log, where users look first
            raise
