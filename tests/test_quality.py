"""The quality harness: task placement, sandboxed execution, oracle cut rates, retrieval tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from exlsp.benchmarks import quality as q


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[q.Task]]:
    return {name: q.load_tasks(name) for name in ("single", "multi", "random")}


def test_the_data_is_the_published_set(tasks: dict[str, list[q.Task]]) -> None:
    assert {k: len(v) for k, v in tasks.items()} == {"single": 1033, "multi": 5815, "random": 1640}
    assert (q.DATA_DIR / "LICENSE").read_text().startswith("The MIT License")


def test_placement_rebuilds_the_true_program(tasks: dict[str, list[q.Task]]) -> None:
    for subset in tasks.values():
        for task in subset:
            p = q.place(task)
            rebuilt = p.document[: p.offset] + p.expected + p.document[p.offset :]
            assert rebuilt == task.prompt + task.middle + task.suffix, task.task_id


def test_whole_line_middles_leave_an_empty_cursor_line(tasks: dict[str, list[q.Task]]) -> None:
    task = tasks["multi"][0]
    p = q.place(task)
    doc = q.document_view(p.document, p.offset, "file:///t.py", "t.py")
    assert doc.lines[doc.line] == "\n" and doc.character == 0
    assert p.expected == task.middle[:-1]
    assert doc.lines[doc.line + 1] == q.split_lines(task.suffix)[0]


def test_document_view_finds_line_and_column() -> None:
    text = "a = 1\r\nbc\n\nxyz"
    for offset, expected in [(0, (0, 0)), (5, (0, 5)), (7, (1, 0)), (9, (1, 2)), (10, (2, 0))]:
        doc = q.document_view(text, offset, "u", "p")
        assert (doc.line, doc.character) == expected, offset
    doc = q.document_view(text, len(text), "u", "p")
    assert (doc.line, doc.character) == (3, 3)


def test_canonical_solutions_pass_and_wrong_ones_fail(tasks: dict[str, list[q.Task]]) -> None:
    for task in tasks["single"][:3] + tasks["multi"][100:102]:
        p = q.place(task)
        assert q.run_program(q.program(task, p, p.expected)) == (True, "passed"), task.task_id
    task = tasks["single"][0]
    p = q.place(task)
    passed, reason = q.run_program(q.program(task, p, "    pass"))
    assert not passed and reason


def test_sandbox_limits_time_and_memory() -> None:
    passed, reason = q.run_program("while True:\n    pass\n", q.Limits(seconds=1.0))
    assert (passed, reason) == (False, "timeout")
    passed, reason = q.run_program("x = bytearray(4 << 30)\n", q.Limits(memory_bytes=256 << 20))
    assert not passed and "MemoryError" in reason
    passed, _ = q.run_program(f"import os\nassert os.getcwd() != {str(Path.cwd())!r}\n")
    assert passed, "programs run in a temporary directory"


def test_oracle_cuts_meet_the_targets(tasks: dict[str, list[q.Task]]) -> None:
    """Post-processing alone: the true middle followed by the rest of the file."""
    for subset, target in (("single", 99.0), ("multi", 95.0)):
        cases = [q.oracle_case(t) for t in tasks[subset]]
        rate = 100 * sum(c.exact for c in cases) / len(cases)
        assert rate >= target, (subset, rate, [c.task_id for c in cases if not c.exact][:10])


def test_oracle_reports_a_wrong_cut() -> None:
    task = q.Task("t/0", "single", "def f(x):\n", "    return x\n", "    y = 1\n", "", "f")
    assert q.oracle_case(task).exact
    # A suffix whose first line repeats the middle: the cut lands too early.
    task = q.Task("t/1", "single", "def f(x):\n", "    return x\n", "    return x\n", "", "f")
    case = q.oracle_case(task)
    assert not case.exact and case.got == ""


def test_retrieval_tasks_need_a_name_from_another_file(tmp_path: Path) -> None:
    (tmp_path / "shapes.py").write_text(
        "def polygon_area(points):\n    return 0.0\n\n\ndef local_helper():\n    return 1\n"
    )
    (tmp_path / "report.py").write_text(
        "import shapes\n\n\ndef local_helper():\n    return 2\n\n\n"
        "def summary(points):\n"
        "    area = shapes.polygon_area(points)\n"
        "    extra = local_helper()\n"
        "    return area + extra\n"
    )
    tasks = q.retrieval_tasks(tmp_path, 0, 0)
    assert [(t.path, t.name, t.expected) for t in tasks] == [
        ("report.py", "polygon_area", "polygon_area(points)")
    ]
    assert tasks[0].line == 8 and tasks[0].column == len("    area = shapes.")


@pytest.mark.slow
def test_model_mode_end_to_end(trained_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "result"
    code = q.main(
        ["model", "--subsets", "single", "--limit", "3", "--model", str(trained_model),
         "--threads", "1", "--name", str(out)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.with_suffix(".json").read_text())
    single = result["subsets"]["single"]
    assert single["tasks"] == 3 and len(single["records"]) == 3
    assert 0 <= single["pass_at_1"] <= 100
    assert result["machine"]["cores"] and result["commit"] is not None
    assert result["loadavg"]["start"] is not None or sys.platform != "linux"
