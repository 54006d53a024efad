"""The aggregated tables and their manifest: plots and report stop on a table damaged since
aggregate wrote it, naming it and the fix, instead of drawing from what is left of it."""
import pandas as pd
import pytest

import plots
import report
from int4lora.tables import MANIFEST, TableDamaged, read_table, write_tables

OVERHEAD = pd.DataFrame({"model": ["m", "m"], "engine": ["vllm", "vllm"], "batch": [1, 8],
                         "tpot_ratio_median": [1.139, 1.128]})


def test_tables_read_back_as_written_and_empty_stays_empty(tmp_path):
    write_tables(tmp_path, {"overhead": OVERHEAD, "memory": pd.DataFrame()})
    pd.testing.assert_frame_equal(read_table(tmp_path, "overhead"), OVERHEAD)
    assert read_table(tmp_path, "memory").empty and read_table(tmp_path, "absent").empty
    assert (tmp_path / MANIFEST).is_file()


@pytest.mark.parametrize("damage, words", [
    (lambda text: text[:len(text) // 2], "bytes, {} when aggregate wrote it (truncated?)"),
    (lambda text: text.replace("1.139", "1.039"), "changed since aggregate wrote it"),
])
def test_a_damaged_table_stops_the_reader_naming_it_and_the_fix(tmp_path, damage, words):
    write_tables(tmp_path, {"overhead": OVERHEAD})
    path = tmp_path / "overhead.csv"
    size = path.stat().st_size
    path.write_text(damage(path.read_text()))
    with pytest.raises(TableDamaged) as exc:
        read_table(tmp_path, "overhead")
    assert str(exc.value).startswith(f"{path}: ")
    assert words.format(size) in str(exc.value) and "-R aggregate" in str(exc.value)


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
