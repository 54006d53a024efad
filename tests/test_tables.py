"""The aggregated tables and their manifest: plots and report stop on a table damaged since
aggregate wrote it, naming it and the fix, instead of drawing from what is left of it."""
import pandas as pd
import pytest

import plots
import report
from int4lora.tables import CHECKSUMS, TableDamaged, read_table, write_tables

OVERHEAD = pd.DataFrame({"model": ["m", "m"], "engine": ["vllm", "vllm"], "batch": [1, 8],
                         "tpot_ratio_median": [1.139, 1.128]})


def test_tables_read_back_as_written_and_empty_stays_empty(tmp_path):
    write_tables(tmp_path, {"overhead": OVERHEAD, "memory": pd.DataFrame()})
    pd.testing.assert_frame_equal(read_table(tmp_path, "overhead"), OVERHEAD)
    assert read_table(tmp_path, "memory").empty and read_table(tmp_path, "absent").empty
    lines = (tmp_path / CHECKSUMS).read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["overhead.csv", "memory.csv"]


@pytest.mark.parametrize("damage", [lambda text: text[:len(text) // 2],
                                    lambda text: text.replace("1.139", "1.039")])
def test_a_damaged_table_stops_the_reader_naming_it_and_the_fix(tmp_path, damage):
    write_tables(tmp_path, {"overhead": OVERHEAD})
    path = tmp_path / "overhead.csv"
    path.write_text(damage(path.read_text()))
    with pytest.raises(TableDamaged) as exc:
        read_table(tmp_path, "overhead")
    assert str(exc.value) == (f"{path}: changed since aggregate wrote it (truncated or edited); "
                              f"rebuild the tables from the result JSONs: snakemake --cores 1 "
                              f"-R aggregate")


def test_the_checksums_are_sha256sum_format(tmp_path):
    import shutil
    import subprocess
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum")
    write_tables(tmp_path, {"overhead": OVERHEAD})
    assert subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=tmp_path,
                          capture_output=True).returncode == 0


def test_tables_without_a_manifest_are_read_as_they_are(tmp_path):
    """Run folders written before the manifest existed (docs/runs/2026-11-*)."""
    OVERHEAD.to_csv(tmp_path / "overhead.csv", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path, "overhead"), OVERHEAD)


@pytest.mark.parametrize("step", ["plots", "report"])
def test_plots_and_report_stop_on_a_truncated_table(tmp_path, step):
    tables = tmp_path / "tables"
    write_tables(tables, {"overhead": OVERHEAD})
    overhead = tables / "overhead.csv"
    overhead.write_text(overhead.read_text()[:20])
    with pytest.raises(TableDamaged, match="overhead.csv"):
        if step == "plots":
            plots.main(str(tables), str(tmp_path / "figures"))
        else:
            report.main(str(tables), str(tmp_path / "figures"), str(tmp_path / "r.md"),
                        str(tmp_path / "r.html"), "p")
