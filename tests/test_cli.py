"""The command line: ``tidings demo`` and friends."""

from __future__ import annotations

import logging
from importlib.metadata import version

from typer.testing import CliRunner

from tidings.cli import app
from tidings.demo import run_demo

runner = CliRunner()


def test_demo_runs_and_prints_a_row_per_listener() -> None:
    result = runner.invoke(app, ["demo", "--quiet", "--users", "200"])
    assert result.exit_code == 0, result.output
    for name in ("send_welcome_mail", "audit", "sync_to_crm", "grant_trial"):
        assert name in result.output
    assert "800 deliveries of 200 events" in result.output
    assert "Traceback" not in result.output


def test_demo_with_live_progress() -> None:
    result = runner.invoke(app, ["demo", "--users", "50"])
    assert result.exit_code == 0, result.output
    assert "grant_trial" in result.output


def test_demo_verbose_shows_the_librarys_logs() -> None:
    try:
        result = runner.invoke(app, ["demo", "--quiet", "--verbose", "--users", "100"])
        assert result.exit_code == 0, result.output
        assert logging.getLogger("tidings").level == logging.INFO
    finally:
        logging.getLogger("tidings").setLevel(logging.NOTSET)


async def test_demo_figures_add_up() -> None:
    progress: list[tuple[int, int]] = []
    result = await run_demo(
        users=300, pause_s=0, on_progress=lambda done, total: progress.append((done, total))
    )
    figures = {f.name: f for f in result.listeners.values()}
    assert figures["send_welcome_mail"].delivered == 300
    assert figures["audit"].delivered == 300
    crm = figures["sync_to_crm"]
    assert (crm.delivered, crm.retried, crm.dead) == (300, 60, 0)
    trial = figures["grant_trial"]
    assert (trial.delivered, trial.retried, trial.dead) == (294, 6, 6)
    assert result.deliveries == 1200
    assert progress[-1] == (1200, 1200)
    assert crm.percentile(0.5) is not None
    assert figures["grant_trial"].percentile(0.99) is not None


def test_no_command_shows_help_and_version_prints() -> None:
    result = runner.invoke(app, [])
    assert "demo" in result.output
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == version("tidings")
