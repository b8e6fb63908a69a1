"""DeployProgress: the step lines and timings of ensemble, export and report, in a log
(plain lines, no control codes), on a terminal (a live bar), and quiet."""

from __future__ import annotations

import io
import re
import time

import pytest

from automl_ad.deploy.progress import DeployProgress, StepTiming, call_with_progress, resolve

_DURATION = r"\d+\.\d s"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_steps_print_a_start_and_a_duration_line_and_record_their_seconds():
    log = io.StringIO()
    progress = DeployProgress(file=log)
    with progress.step("export bundle"):
        with progress.step("export: ONNX graph"):
            time.sleep(0.05)
        with progress.step("export: checksums"):
            pass
    lines = log.getvalue().splitlines()
    assert lines[0] == "export bundle ..."
    assert lines[1] == "  export: ONNX graph ..."
    assert re.fullmatch(rf"  export: ONNX graph {_DURATION}", lines[2])
    assert re.fullmatch(rf"export bundle {_DURATION}", lines[-1])
    assert len(lines) == 6
    assert [(t.name, t.depth) for t in progress.timings] == [
        ("export bundle", 0), ("export: ONNX graph", 1), ("export: checksums", 1)]
    seconds = progress.seconds()
    assert seconds["export: ONNX graph"] >= 0.05
    assert seconds["export bundle"] >= seconds["export: ONNX graph"] + seconds["export: checksums"]
    table = progress.table().splitlines()
    assert table[0].split() == ["step", "seconds"]
    assert table[1].startswith("export bundle") and table[2].startswith("  export: ONNX graph")


def test_a_log_gets_plain_lines_and_at_most_one_count_line_per_interval():
    log = io.StringIO()
    progress = DeployProgress(file=log, plain_every_s=3600)
    with progress.step("report: heat-map tiles [test]", total=50) as step:
        for _ in range(50):
            step.advance()
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text  # no control codes in a log
    assert text.splitlines()[0] == "report: heat-map tiles [test] ..."  # brackets are not rich markup
    assert len(text.splitlines()) == 2  # no count line within the interval

    chatty = io.StringIO()
    progress = DeployProgress(file=chatty, plain_every_s=0)
    with progress.step("scoring", total=3) as step:
        step.advance(2)
        step.advance()
    assert chatty.getvalue().splitlines()[1] == "scoring 2/3"  # the last count is the end line's
    assert len(chatty.getvalue().splitlines()) == 3


def test_a_terminal_gets_a_live_bar_that_leaves_only_the_duration_line():
    screen = _Terminal()
    progress = DeployProgress(file=screen)
    with progress.step("report: scoring", total=4) as step:
        for _ in range(4):
            step.advance()
            time.sleep(0.01)
    assert progress._bars is None  # the live display stopped with its last bar
    text = screen.getvalue()
    assert "\x1b" in text and re.search(r"━+.*\d/4", text)  # a bar, drawn with cursor control codes
    assert re.search(rf"report: scoring {_DURATION}", text)
    with progress.step("next step"):  # a later bar-less step prints as before
        pass
    assert screen.getvalue().rstrip().endswith("s") and "next step ..." in screen.getvalue()


def test_quiet_prints_nothing_and_still_records(capsys):
    progress = DeployProgress(quiet=True)
    with progress.step("report", total=2) as step:
        step.advance(2)
    assert capsys.readouterr() == ("", "")
    assert progress.quiet and [t.name for t in progress.timings] == ["report"]


def test_the_default_stream_is_stderr_at_the_time_of_writing(capsys):
    progress = DeployProgress()
    with progress.step("ensemble"):
        pass
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("ensemble ...\n")


def test_a_failing_step_says_so_records_its_time_and_lets_the_error_through():
    log = io.StringIO()
    progress = DeployProgress(file=log)
    with pytest.raises(ValueError, match="boom"):
        with progress.step("export: ONNX graph"):
            raise ValueError("boom")
    assert re.fullmatch(rf"export: ONNX graph failed after {_DURATION}", log.getvalue().splitlines()[-1])
    assert progress.timings == [StepTiming("export: ONNX graph", progress.timings[0].seconds, 0, failed=True)]
    with progress.step("after the failure"):  # depth and the active progress are restored
        assert resolve(None) is progress
    assert progress.timings[-1].depth == 0 and "(failed)" in progress.table()


def test_code_without_a_progress_parameter_reports_into_the_running_step():
    outer = DeployProgress(quiet=True)
    assert resolve(None) is not outer and resolve(None).quiet  # nothing running: a quiet one
    with outer.step("export"):
        with resolve(None).step("export: checksums"):  # what export_bundle does when called without one
            pass
    assert [(t.name, t.depth) for t in outer.timings] == [("export", 0), ("export: checksums", 1)]
    explicit = DeployProgress(quiet=True)
    with outer.step("report"):
        assert resolve(explicit) is explicit


def test_call_with_progress_passes_it_only_to_callees_that_take_it():
    progress = DeployProgress(quiet=True)

    def old(folder: str, *, k: int) -> tuple[str, int]:
        return folder, k

    def new(folder: str, *, k: int, progress: DeployProgress | None = None) -> DeployProgress | None:
        return progress

    assert call_with_progress(old, "f", k=3, progress=progress) == ("f", 3)
    assert call_with_progress(new, "f", k=3, progress=progress) is progress
