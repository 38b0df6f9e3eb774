"""benchmarks.common.write_section: reruns replace the generated block and keep the notes."""

from benchmarks.common import GENERATED_BEGIN, GENERATED_END, write_section


def test_rerun_keeps_notes_and_other_sections(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section("gmm", "| a |\n| 1 |", str(path))
    write_section("moe layer", "| b |\n| 2 |", str(path))
    end = f"| 2 |\n{GENERATED_END}\n"
    path.write_text(path.read_text().replace(end, end + "\nNotes.\n"))

    write_section("moe layer", "| b |\n| 3 |", str(path))

    text = path.read_text()
    assert "| 2 |" not in text and "| 3 |" in text
    assert text.index("| 3 |") < text.index("Notes.")
    assert "## gmm\n\n" + GENERATED_BEGIN + "\n| a |\n| 1 |\n" + GENERATED_END in text
    assert text.count("## moe layer\n") == 1


def test_section_without_markers_is_replaced_whole(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## dispatch\n\nold table\n\n## gmm\n\nkept\n")
    write_section("dispatch", "new table", str(path))
    text = path.read_text()
    assert "old table" not in text and "new table" in text and "kept" in text
