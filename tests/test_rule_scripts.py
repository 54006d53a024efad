"""Every rule's script as Snakemake runs it: `script:` writes its own preamble (imports, the
pickled `snakemake` object) ahead of the file's source (snakemake.script.PythonScript.write_script)
and runs the result. Tests that call main() never see that file: a `from __future__` import, legal
at the top of the script, is a SyntaxError after the preamble (tune_lora_kernels, H100 run of
2026-11-25)."""
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from snakemake.script import PythonScript

from conftest import ROOT

RULES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
SCRIPTS = sorted({(rules.parent / m).resolve() for rules in RULES
                  for m in re.findall(r'^\s+"(\.\./scripts/\w+\.py)"', rules.read_text(), re.M)})


def test_every_rule_script_is_found():
    assert len(SCRIPTS) >= 12 and all(p.is_file() for p in SCRIPTS)
    assert Path(ROOT / "workflow/scripts/tune_lora_kernels.py").resolve() in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_rule_script_compiles_behind_snakemakes_preamble(script):
    buf = io.BytesIO()
    PythonScript.write_script(SimpleNamespace(source=script.read_text()),
                              "######## snakemake preamble start\nimport sys\n", buf)
    compile(buf.getvalue().decode(), str(script), "exec")
