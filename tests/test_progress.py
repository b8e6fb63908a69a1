"""Search progress without a terminal: one plain line per finished trial."""

from __future__ import annotations

from automl_ad.tuning.budget import Ledger, parse_budget
from automl_ad.tuning.progress import SearchProgress


def test_finished_trials_print_one_line_each_when_not_a_terminal(tmp_path, capsys):
    progress = SearchProgress(ledger=Ledger(tmp_path, parse_budget("3trials")), max_epochs=4, plain_lines=True)
    progress.update("t1", {"method": "draem"}, "RUNNING", {"epoch": 1, "objective": 0.5})
    progress.update("t1", {"method": "draem"}, "finished", {"epoch": 4, "objective": 0.7})
    progress.update("t2", {"method": "nsa"}, "error", None)
    progress.update("t2", {"method": "nsa"}, "error", None)  # no repeat for the same state
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "t1 draem finished after 4/4 rounds, val 0.7000" in lines[0] and "best 0.7000 (draem)" in lines[0]
    assert "t2 nsa error" in lines[1] and "budget" in lines[1]


def test_a_terminal_gets_the_live_table_only(tmp_path, capsys):
    progress = SearchProgress(ledger=Ledger(tmp_path, parse_budget("3trials")), max_epochs=4, plain_lines=False)
    progress.update("t1", {"method": "draem"}, "finished", {"epoch": 4, "objective": 0.7})
    assert capsys.readouterr().out == ""
    assert progress.render().row_count == 1
