from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from receiver.cli import cli
from receiver.cliutil import program_name
from receiver.fakes.runflow import FakeRunflow
from receiver.fakes.server import serve_in_thread
from receiver.normalize import VERDICT_ONLY, normalize, parse_body
from receiver.sinkspec import SinkSpec
from receiver.store import Delivery, Forwarding, Store

from .helpers import FIXTURES, SECRET_A, SECRET_B, SIGNATURES, fixture
from .servers import ReceiverProcess, free_port, run_cli

COMPLETED_ID = "0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11"


def _fill(database: Path) -> None:
    sink = SinkSpec(name="consumer", type="http", url="http://127.0.0.1:9/events")
    store = Store(str(database), forwarding=Forwarding(sinks=(sink,)))
    store.open()
    try:
        for name in (
            "evaluation-completed.json",
            "get-evaluation-embedded.json",
            "evaluation-failed-envelope.json",
        ):
            body = fixture(name)
            asyncio.run(store.ingest(Delivery(body, normalize(parse_body(body)))))
    finally:
        store.close()


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    return CliRunner(
        env={
            "RECEIVER_DATABASE": str(tmp_path / "r.db"),
            "RUNFLOW_WEBHOOK_SECRET": f"{SECRET_A},{SECRET_B}",
        }
    )


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    _fill(tmp_path / "r.db")
    return tmp_path


def test_migrate_is_idempotent(runner: CliRunner, tmp_path: Path) -> None:
    first = runner.invoke(cli, ["migrate"])
    second = runner.invoke(cli, ["migrate"])
    assert first.exit_code == second.exit_code == 0
    assert "applied migrations 1" in first.output
    assert "up to date" in second.output


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--older-than", "0d", "--yes"],
        ["forwards", "--retry-all-dead"],
        ["replay", "1"],
        ["reconcile"],
    ],
)
def test_commands_that_write_never_migrate(
    runner: CliRunner, filled: Path, args: list[str]
) -> None:
    """A server of the version before may be running: a migration under it (a daily prune
    after an upgrade) would leave it writing by its older rules into the newer schema."""
    database = str(filled / "r.db")
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("DELETE FROM migrations WHERE version = (SELECT max(version) FROM migrations)")
    before = _versions(database)
    result = runner.invoke(cli, args)
    assert result.exit_code == 1
    assert "run `receiver migrate`" in result.output
    assert _versions(database) == before


def test_backup_copies_a_database_an_older_version_migrated(
    runner: CliRunner, filled: Path
) -> None:
    """The copy to keep before `receiver migrate` is taken at the older schema: backup, which
    only reads, asked for the migration first."""
    database = str(filled / "r.db")
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("DELETE FROM migrations WHERE version = (SELECT max(version) FROM migrations)")
    before = _versions(database)
    result = runner.invoke(cli, ["backup", str(filled / "copy.db")])
    assert result.exit_code == 0, result.output
    assert _versions(str(filled / "copy.db")) == _versions(database) == before


def _versions(database: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return [version for (version,) in conn.execute("SELECT version FROM migrations")]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["query"], ["0193a7c2-5b1e-7c3d-9f10-2a4b6c8d0e11", "customer-job-124", "failed"]),
        (["query", "--failed"], ["customer-job-123"]),
        (["query", "--passed"], ["(no evaluations match)"]),
        (["query", "--status", "failed"], ["customer-job-124", "invalid_media"]),
        (["query", "--client-ref", "nobody"], ["(no evaluations match)"]),
        (["show", COMPLETED_ID], ["not passed, score 0.62", "anatomy/hands", "receipts=1"]),
        (["stats"], ["evaluations  2", "pass rate    0.0%", "invalid_media: 1"]),
        # stats takes every filter query takes (as /api/stats takes the list's)
        (["stats", "--status", "failed"], ["evaluations  1", "failed     1", "invalid_media: 1"]),
        (["stats", "--client-ref", "customer-job-123"], ["evaluations  1", "mean score   0.62"]),
        (["stats", "--failed", "--search", "job-123"], ["evaluations  1", "(0 passed, 1 not)"]),
        (["stats", "--failure-code", "invalid_media"], ["evaluations  1", "pass rate    -"]),
        (["stats", "--until", "2000-01-01T00:00:00Z"], ["evaluations  0"]),
    ],
)
def test_read_commands(
    runner: CliRunner, filled: Path, args: list[str], expected: list[str]
) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


HOSTILE = "\x1b]0;owned\x07\x1b[2J\rforged\nline"  # retitle, clear, forge a line


@pytest.mark.parametrize("command", [["query"], ["show", COMPLETED_ID], ["stats"]])
def test_payload_strings_reach_the_terminal_with_their_control_characters_escaped(
    runner: CliRunner, tmp_path: Path, command: list[str]
) -> None:
    """As the dashboard and chat escape theirs: the bytes went to the terminal as they were."""
    body = json.loads(fixture("get-evaluation-embedded.json"))
    body["client_ref"] = body["failure_code"] = f"ref{HOSTILE}"
    body["top_issues"] = [f"issue{HOSTILE}"]
    body["judges"][0]["issues"][0]["detail"] = f"detail{HOSTILE}"
    store = Store(str(tmp_path / "r.db"))
    store.open()
    try:
        raw = json.dumps(body).encode()
        asyncio.run(store.ingest(Delivery(raw, normalize(parse_body(raw)))))
    finally:
        store.close()
    result = runner.invoke(cli, command)
    assert result.exit_code == 0, result.output
    assert "\\x1b]0;owned\\x07\\x1b[2J\\rforged\\nline" in result.output
    assert not any(c in result.output for c in "\x1b\x07\r")
    assert "forged" not in "".join(line[:7] for line in result.output.splitlines())


@pytest.mark.parametrize("command", [["query"], ["show", COMPLETED_ID], ["stats"]])
def test_json_output_parses(runner: CliRunner, filled: Path, command: list[str]) -> None:
    result = runner.invoke(cli, [*command, "--json"])
    assert result.exit_code == 0
    json.loads(result.output)


@pytest.mark.parametrize("command", ["query", "forwards"])
def test_lists_go_past_limit_with_the_cursor_they_print(
    runner: CliRunner, filled: Path, command: str
) -> None:
    """They stopped at --limit (at most 500) with no way further, while the API pages."""
    everything = json.loads(runner.invoke(cli, [command, "--json"]).stdout)
    assert len(everything) >= 2
    seen: list[str] = []
    page: list[str] = []
    while True:
        result = runner.invoke(cli, [command, "--limit", "1", *page])
        assert result.exit_code == 0, result.output
        *rows, last = result.stdout.splitlines()
        seen += [row.split()[0].lstrip("#") for row in rows if not row.startswith("id ")]
        if not last.startswith("(more: repeat with --cursor "):
            seen.append(last.split()[0].lstrip("#"))
            break
        page = ["--cursor", last.removeprefix("(more: repeat with --cursor ").rstrip(")")]
        # --json keeps printing the list it always printed; the way on goes to stderr
        listed = runner.invoke(cli, [command, "--limit", "1", "--json"])
        assert len(json.loads(listed.stdout)) == 1
        assert listed.stderr.startswith("(more: repeat with --cursor ")
    assert seen == [str(item["id"]) for item in everything]


@pytest.mark.parametrize("command", ["query", "forwards"])
def test_a_cursor_not_printed_by_the_command_is_one_line(
    runner: CliRunner, filled: Path, command: str
) -> None:
    result = runner.invoke(cli, [command, "--cursor", "nonsense"])
    assert result.exit_code == 1
    assert "cursor is not valid" in result.output


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_sign_prints_the_listed_signatures(runner: CliRunner, name: str) -> None:
    path = str(FIXTURES / name)
    assert runner.invoke(cli, ["sign", path]).output.strip() == SIGNATURES[name][0]
    signed_b = runner.invoke(cli, ["sign", path, "--secret", SECRET_B]).output.strip()
    assert signed_b == SIGNATURES[name][1]


MISTAKES = {
    "no-database": (["query"], {}, "no database"),
    # Commands that write never make a database either: they would report nothing to do.
    "prune-no-database": (["prune", "--older-than", "90d"], {}, "no database"),
    "retry-all-dead-no-database": (["forwards", "--retry-all-dead"], {}, "no database"),
    "replay-no-database": (["replay", "1"], {}, "no database"),
    "feedback-no-rating": (["feedback", "some-id"], {}, "say one of --up, --down or --clear"),
    "feedback-two-ratings": (  # it sent the last one
        ["feedback", "some-id", "--up", "--down"],
        {},
        "say one of --up, --down or --clear, not --up and --down",
    ),
    "forwards-dead-and-state": (  # it listed the dead ones
        ["forwards", "--dead", "--state", "done"],
        {},
        "--dead lists the dead forwards: not with --state done",
    ),
    "query-passed-and-failed": (  # it listed the not passed ones
        ["query", "--passed", "--failed"],
        {},
        "--passed and --failed exclude each other",
    ),
    "forwards-retry-and-retry-all": (  # it retried the one alone
        ["forwards", "--retry", "1", "--retry-all-dead"],
        {},
        "give --retry ID or --retry-all-dead, not both",
    ),
    "forwards-retry-with-a-filter": (  # it retried forward 1 of whatever sink
        ["forwards", "--retry", "1", "--sink", "nosuch"],
        {},
        "--retry ID names its forward: not with --dead, --state or --sink",
    ),
    "forwards-retry-all-dead-of-a-state": (
        ["forwards", "--retry-all-dead", "--state", "done"],
        {},
        "--retry-all-dead sends the dead forwards: not --state done",
    ),
    "query-empty-search": (  # it listed every evaluation (the API answers 400)
        ["query", "--search", ""],
        {},
        "Invalid value for '--search': must not be empty",
    ),
    "stats-empty-client-ref": (["stats", "--client-ref", ""], {}, "'--client-ref': must not"),
    "prune-too-long-ago": (  # a traceback (OverflowError)
        ["prune", "--older-than", "99999999d"],
        {"migrated": "1"},
        "duration '99999999d' reaches back before year 1",
    ),
    "backup-beside-a-file": (  # a traceback (FileExistsError from mkdir)
        ["backup", "body.json/copy.db"],
        {"migrated": "1"},
        "cannot write body.json/copy.db: [Errno 17] File exists",
    ),
    "backup-not-a-database": (
        ["backup", "copy.db"],
        {"RECEIVER_DATABASE": "body.json"},
        "cannot back up body.json: file is not a database",
    ),
    "query-not-a-database": (  # a traceback (sqlite3.DatabaseError)
        ["query"],
        {"RECEIVER_DATABASE": "body.json"},
        "RECEIVER_DATABASE: cannot open 'body.json': file is not a database",
    ),
    "query-not-a-database-from-database-url": (  # named RECEIVER_DATABASE, not set at all
        ["query"],
        {"RECEIVER_DATABASE": "", "DATABASE_URL": "sqlite:///body.json"},
        "DATABASE_URL: cannot open 'body.json': file is not a database",
    ),
    "query-no-database-from-database-url": (
        ["query"],
        {"RECEIVER_DATABASE": "", "DATABASE_URL": "sqlite:///none.db"},
        "no database at 'none.db': set DATABASE_URL to the server's",
    ),
    "query-a-folder": (  # a traceback (sqlite3.OperationalError)
        ["query"],
        {"RECEIVER_DATABASE": "."},
        "RECEIVER_DATABASE: cannot open '.': unable to open database file",
    ),
    "replay-past-the-largest-id": (  # a traceback (OverflowError)
        ["replay", str(2**63)],
        {"migrated": "1"},
        "9223372036854775808 is not in the range 1<=x<=9223372036854775807",
    ),
    "retry-past-the-largest-id": (
        ["forwards", "--retry", str(2**63)],
        {"migrated": "1"},
        "is not in the range",
    ),
    "unknown-id": (["show", "nope"], {"migrated": "1"}, "no evaluation 'nope'"),
    "bad-since": (["query", "--since", "yesterday"], {}, "--since"),
    "bad-status": (["query", "--status", "done"], {}, "--status"),
    "unknown-command": (["bogus"], {}, "No such command"),
    "sign-missing-file": (["sign", "missing.json"], {}, "missing.json"),
    "sign-no-secret": (
        ["sign", "body.json"],
        {"RUNFLOW_WEBHOOK_SECRET": ""},
        "RUNFLOW_WEBHOOK_SECRET",
    ),
    "serve-no-secret": (["serve"], {"RUNFLOW_WEBHOOK_SECRET": ""}, "RUNFLOW_WEBHOOK_SECRET"),
    "serve-bad-port": (["serve"], {"PORT": "abc"}, "PORT must be"),
    "serve-bad-limit": (["serve"], {"RECEIVER_MAX_BODY_BYTES": "lots"}, "RECEIVER_MAX_BODY_BYTES"),
    "send-test-nobody-listening": (
        ["send-test", f"http://127.0.0.1:{free_port()}/webhooks/runflow"],
        {},
        "cannot reach",
    ),
    "send-test-bad-url": (["send-test", "http://[::1"], {}, "cannot reach"),
    "serve-workers-bad-sink": (
        ["serve", "--workers", "2", "--port", str(free_port())],
        {"RECEIVER_CONFIG": "bad-sink.toml"},
        "sink 'billing': secret must start with whsec_",
    ),
    "worker-bad-sink-names-the-file": (
        ["worker"],
        {"RECEIVER_CONFIG": "bad-sink.toml"},
        "bad-sink.toml: sink 'billing': secret must start with whsec_",
    ),
}


@pytest.mark.parametrize(("args", "env", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_user_mistakes_exit_1_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "body.json").write_bytes(b"{}")
    (tmp_path / "bad-sink.toml").write_text(
        '[[sinks]]\nname = "billing"\ntype = "http"\nurl = "https://billing.example.com/hooks"\n'
        'secret = "not-a-whsec"\n'
    )
    environ = {
        "PATH": "/usr/bin:/bin",
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
        **{k: v for k, v in env.items() if k != "migrated"},
    }
    if "migrated" in env:
        assert run_cli("migrate", cwd=tmp_path, env=environ).returncode == 0
    result = run_cli(*args, cwd=tmp_path, env=environ)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]], result.stderr
    assert lines[0].startswith("Error:")
    assert message in lines[0]
    if "migrated" not in env:
        assert not (tmp_path / "r.db").exists()


def test_refetch_stores_nothing_while_runflow_still_answers_the_verdict_left(
    runner: CliRunner, tmp_path: Path
) -> None:
    """A completed callback followed a failed one (no `updated_at`: the later arrival wins) and
    Runflow's GET still answers failed: stored, it would turn the evaluation back to failed.
    `receiver refetch` stores nothing and says why (exit 1); once the GET has caught up it
    stores it."""
    store = Store(str(tmp_path / "r.db"), forwarding=Forwarding(refetch=True))  # as the CLI's
    store.open()
    try:
        for verdict, own in (("failed", {"failure_code": "timed_out"}), ("completed", {})):
            body = json.dumps(
                {"event": f"evaluation.{verdict}", "evaluation_id": COMPLETED_ID, **own}
            ).encode()
            asyncio.run(store.ingest(Delivery(body, normalize(parse_body(body)))))
    finally:
        store.close()
    fake = FakeRunflow("rf_test_key")
    behind = dict.fromkeys(VERDICT_ONLY["completed"])
    fake.add(COMPLETED_ID, **behind, status_code="failed", failure_code="timed_out")
    with serve_in_thread(fake.app) as url:
        env = {"RUNFLOW_API_KEY": "rf_test_key", "RUNFLOW_API_BASE": url}
        lagging = runner.invoke(cli, ["refetch", COMPLETED_ID], env=env)
        status = runner.invoke(cli, ["show", COMPLETED_ID, "--json"]).output
        fake.add(COMPLETED_ID)  # Runflow's GET has caught up
        caught_up = runner.invoke(cli, ["refetch", COMPLETED_ID], env=env)
    assert lagging.exit_code == 1
    assert lagging.output == (
        f"Error: {COMPLETED_ID} not stored: Runflow still answers failed, not yet the completed"
        " verdict that followed it; try again later\n"
    )
    assert json.loads(status)["evaluation"]["status"] == "completed"
    assert caught_up.exit_code == 0, caught_up.output


@pytest.mark.parametrize("command", [["query"], ["stats"], ["forwards"], ["backup", "copy.db"]])
def test_commands_that_forward_nothing_need_no_sink_secrets(
    tmp_path: Path, command: list[str]
) -> None:
    """An operator without the chat webhooks' secrets in the shell can still look at data."""
    (tmp_path / "receiver.toml").write_text(
        '[[sinks]]\nname = "ops"\ntype = "slack"\nurl = "env:SLACK_WEBHOOK_URL"\n'
    )
    environ = {
        "PATH": "/usr/bin:/bin",
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
    }
    assert run_cli("migrate", cwd=tmp_path, env=environ).returncode == 0
    done = run_cli(*command, cwd=tmp_path, env=environ)
    assert done.returncode == 0, done.stderr
    refused = run_cli("worker", cwd=tmp_path, env=environ)
    assert refused.returncode == 1
    assert "SLACK_WEBHOOK_URL is not set" in refused.stderr


@pytest.mark.parametrize(("allow", "warned"), [("true", True), ("false", False)])
def test_serve_warns_at_start_when_unsigned_callbacks_are_accepted(
    tmp_path: Path, allow: str, warned: bool
) -> None:
    """Left on from a local .env, it was said only in the logs, once a callback came."""
    with ReceiverProcess(tmp_path, RECEIVER_ALLOW_UNSIGNED=allow):
        pass
    banner = (tmp_path / "server.log").read_text()
    assert "receiver: database" in banner
    warning = (
        "receiver: warning       RECEIVER_ALLOW_UNSIGNED=true: callbacks without a"
        " Runflow-Signature are accepted (local development only)"
    )
    assert (warning in banner) is warned


LONG = "k3Jx9-QpL2vN8wYt"  # 16: the shortest token without a warning


@pytest.mark.parametrize(
    ("tokens", "warned"),
    [
        ({"RECEIVER_DASHBOARD_TOKEN": "t0k3n"}, ["RECEIVER_DASHBOARD_TOKEN"]),
        (
            {"RECEIVER_DASHBOARD_TOKEN": LONG, "RECEIVER_METRICS_TOKEN": "m9"},
            ["RECEIVER_METRICS_TOKEN"],
        ),
        (
            {"RECEIVER_DASHBOARD_TOKEN": LONG[:-1], "RECEIVER_METRICS_TOKEN": LONG[1:]},
            ["RECEIVER_DASHBOARD_TOKEN", "RECEIVER_METRICS_TOKEN"],
        ),
        ({"RECEIVER_DASHBOARD_TOKEN": LONG, "RECEIVER_METRICS_TOKEN": LONG}, []),
    ],
)
def test_serve_warns_at_start_of_a_token_that_is_easy_to_guess(
    tmp_path: Path, tokens: dict[str, str], warned: list[str]
) -> None:
    """Accepted in silence; refused, they would stop a deployment on upgrade. The token is
    never printed."""
    with ReceiverProcess(tmp_path, **tokens):
        pass
    banner = (tmp_path / "server.log").read_text()
    assert "receiver: database" in banner
    warnings = [line for line in banner.splitlines() if "characters: easy to guess" in line]
    assert [line.split()[2] for line in warnings] == warned
    for line in warnings:
        assert "receiver: warning       RECEIVER_" in line
        assert not any(token in line for token in tokens.values())


def test_send_test_names_the_next_command_as_the_user_ran_this_one(tmp_path: Path) -> None:
    """After `make run` the program is `.venv/bin/receiver`: `receiver show ID`, as it said,
    is not found."""
    bin_dir = Path(sys.executable).parent
    with ReceiverProcess(tmp_path) as server:
        url = f"{server.url}/webhooks/runflow"
        for program, search_path in (("./receiver", "/usr/bin:/bin"), ("receiver", str(bin_dir))):
            sent = subprocess.run(
                [program, "send-test", url],
                cwd=bin_dir,
                env={**server.env, "PATH": search_path},
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stderr
            assert f"\nsee it: {program} show " in sent.stdout


@pytest.mark.parametrize(
    ("argv0", "search_path", "expected"),
    [
        ("{bin}/receiver", "{bin}:/usr/bin", "receiver"),  # found on PATH
        ("{bin}/receiver", "/usr/bin", "{bin}/receiver"),  # as `.venv/bin/receiver` ran
        ("{bin}/__main__.py", "{bin}", "python -m receiver"),
        ("{bin}/__main__.py", "/usr/bin", "{bin}/python -m receiver"),
        ("-c", "/usr/bin", "receiver"),
    ],
)
def test_program_name(tmp_path: Path, argv0: str, search_path: str, expected: str) -> None:
    """Named so it can be typed again, a path with a space in it too."""
    bin_dir = tmp_path / "my bin"
    bin_dir.mkdir()
    for name in ("receiver", "python", "__main__.py"):
        (bin_dir / name).write_text("")
        (bin_dir / name).chmod(0o755)
    shown = program_name(
        argv0.format(bin=bin_dir), str(bin_dir / "python"), search_path.format(bin=bin_dir)
    )
    assert shlex.split(shown) == shlex.split(expected.format(bin=shlex.quote(str(bin_dir))))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path, workers: str) -> None:
    """The default 8000 is often taken: say which address and how to choose another, exit 1,
    and print no banner claiming to serve there (it was a uvicorn log line and status 3)."""
    environ = {
        "PATH": "/usr/bin:/bin",
        "RECEIVER_DATABASE": str(tmp_path / "r.db"),
        "RUNFLOW_WEBHOOK_SECRET": SECRET_A,
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--workers", workers, cwd=tmp_path, env={**environ, "PORT": str(port)}
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another port with --port or PORT, or another --host"
    ]


def test_show_says_where_a_refetch_stands(runner: CliRunner, filled: Path) -> None:
    """A refetch that gave up was seen only in the worker's log and a metric."""
    with sqlite3.connect(filled / "r.db") as conn:
        conn.execute(
            "UPDATE evaluations SET refetch_state = 'failed', refetch_attempts = 10,"
            " refetch_error = 'Runflow answered 404: no such evaluation' WHERE id = ?",
            (COMPLETED_ID,),
        )
    result = runner.invoke(cli, ["show", COMPLETED_ID])
    assert result.exit_code == 0, result.output
    assert (
        "refetch      failed attempts=10 error: Runflow answered 404: no such evaluation"
        in result.output
    )
