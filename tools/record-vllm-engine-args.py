"""Record vLLM's EngineArgs field names (what `settings:` of a vllm engine may hold) into
resources/vllm-engine-args.json, so that config validation on a machine without vLLM
checks settings against the real fields. Run where vLLM is importable, or point it at an
unpacked vLLM source tree:  python tools/record-vllm-engine-args.py [VLLM_SOURCE_DIR]"""
import ast
import re
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "resources" / "vllm-engine-args.json"


def from_source(root: Path) -> tuple[str, list[str]]:
    tree = ast.parse((root / "vllm" / "engine" / "arg_utils.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
    names = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)]
    text = (root / "vllm" / "_version.py").read_text()
    version = re.search(r"^__version__ = version = ['\"]([^'\"]+)", text, re.M).group(1)
    return version, names


def from_installed() -> tuple[str, list[str]]:
    import dataclasses

    import vllm
    from vllm.engine.arg_utils import EngineArgs
    return vllm.__version__, [f.name for f in dataclasses.fields(EngineArgs)]


if __name__ == "__main__":
    version, names = from_source(Path(sys.argv[1])) if len(sys.argv) > 1 else from_installed()
    public = sorted(n for n in names if not n.startswith("_"))
    OUT.write_text(json.dumps({"vllm": version, "engine_args": public}, indent=1) + "\n")
    print(f"{len(public)} EngineArgs fields of vLLM {version} -> {OUT}")
