"""``wecombot COMMAND --help``: a command with options of its own shows them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wecombot.cli import main
from wecombot.shared import clip, without_credentials


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own help exits
        code = int(exc.code or 0)
    assert code == 0
    return capsys.readouterr().out


def test_doctor_help_shows_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    shown = _help(capsys, "doctor", "--help")
    assert shown.startswith("usage: wecombot doctor")
    assert "--public-url PUBLIC_URL" in shown and "--timeout TIMEOUT" in shown


def test_dlq_help_shows_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    shown = _help(capsys, "dlq", "--help")
    assert shown.startswith("usage: wecombot dlq")
    assert "--consumer {llm,sender}" in shown and "--limit LIMIT" in shown and "show" in shown


def test_a_command_without_options_has_help_and_refuses_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shown = _help(capsys, "setup", "-h")
    assert shown.startswith("usage: wecombot setup")
    assert "create or update the JetStream streams" in shown
    with pytest.raises(SystemExit) as refused:
        main(["setup", "--nope"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_the_command_list_names_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    shown = _help(capsys, "--help")
    for command in ("gateway", "llm", "sender", "token", "setup", "dev", "dlq", "doctor"):
        assert command in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://bot:pw@nats:4222", "nats://nats:4222"),
        ("nats://bot:p@ss/w:rd@nats:4222", "nats://nats:4222"),  # "@" and "/" in it
        ("nats://t0ken@a:4222, tls://u:p@b:4222", "nats://a:4222,tls://b:4222"),
        ("u:p@host:4222", "host:4222"),
    ],
)
def test_without_credentials(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


def test_clip() -> None:
    assert clip("a  long\nanswer", 8) == "a long …"
    assert clip("short") == "short"


def test_a_skipped_check_names_only_the_variables_at_fault() -> None:
    from wecombot.doctor import _fix_first

    problems = [
        "WECOM_CORP_ID is required (the CorpID)",
        "WECOM_SECRET is required (the Secret)",
        "WECOM_SECRET must not be blank",
    ]
    assert _fix_first(problems) == "fix WECOM_CORP_ID and WECOM_SECRET first (see settings above)"
    assert _fix_first(problems[:1]) == "fix WECOM_CORP_ID first (see settings above)"
    assert _fix_first([*problems, "WECOM_API_BASE must be a URL"]) == (
        "fix WECOM_CORP_ID, WECOM_SECRET and WECOM_API_BASE first (see settings above)"
    )
    # Every setting a problem names (the first word alone named NATS_USER, set, for the
    # missing NATS_PASSWORD), and never a word that is none.
    assert _fix_first(["NATS_USER and NATS_PASSWORD go together"]) == (
        "fix NATS_USER and NATS_PASSWORD first (see settings above)"
    )
    assert _fix_first(["the proxy for the model calls is a socks5:// proxy"]) == (
        "fix the settings first (see settings above)"
    )


def test_every_documented_setting_is_known_and_every_known_one_documented() -> None:
    """The names are read off the loaders: one a loader reads only in some case (missed
    here), or one .env.example forgot, would make a correct .env look misspelt."""
    from wecombot.names import PREFIXES, known_settings

    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    documented = {
        name
        for name in re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.MULTILINE)
        if name.startswith(PREFIXES)
    }
    assert known_settings() == documented


def test_a_misspelt_name_in_dotenv_is_said_with_the_one_meant() -> None:
    from wecombot.names import misspelt

    assert misspelt(["LLM_MAX_CONCURENCY", "WECOM_CORPID", "LLM_MAX_TURNS", "PATH"]) == [
        "./.env sets LLM_MAX_CONCURENCY, which is no setting (LLM_MAX_CONCURRENCY?): "
        "it does nothing",
        "./.env sets WECOM_CORPID, which is no setting (WECOM_CORP_ID?): it does nothing",
    ]
    assert misspelt(["WECOMBOT_SOMETHING_ELSE_ENTIRELY"]) == [
        "./.env sets WECOMBOT_SOMETHING_ELSE_ENTIRELY, which is no setting: it does nothing"
    ]


def test_a_setting_in_the_wrong_case_in_dotenv_is_said() -> None:
    """Names are case-sensitive: ``openai_api_key=sk-…`` in ./.env left the llm on the
    offline model, and ``log_level=debug`` did nothing, both without a word."""
    from wecombot.names import misspelt

    assert misspelt(["openai_api_key", "Log_Level", "llm_max_concurency", "log_file"]) == [
        "./.env sets openai_api_key, which is no setting (OPENAI_API_KEY?): it does nothing",
        "./.env sets Log_Level, which is no setting (LOG_LEVEL?): it does nothing",
        "./.env sets llm_max_concurency, which is no setting (LLM_MAX_CONCURRENCY?): "
        "it does nothing",
    ]  # log_file: nothing of ours is close, it may well be another program's


@pytest.mark.parametrize("command", ["dev", "doctor", "setup", "dlq"])
def test_a_dotenv_that_is_not_utf8_is_said_with_its_name(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ./.env saved as GBK (an editor on Chinese Windows, a Chinese welcome message)
    ended each command that reads it in a UnicodeDecodeError traceback naming no file."""
    (tmp_path / ".env").write_bytes("LOG_LEVEL=info\nLLM_WELCOME_MESSAGE=欢迎使用\n".encode("gbk"))
    monkeypatch.chdir(tmp_path)
    assert main([command]) == 2
    said = capsys.readouterr().err
    assert f"wecombot {command}: .env is not UTF-8 (line 2: byte 0xbb)" in said, said
    assert "Traceback" not in said
