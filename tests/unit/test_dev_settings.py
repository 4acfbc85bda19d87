"""``wecombot dev``'s own settings: the console port, the model label, sandbox or not."""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wecombot.dev import (
    CONSOLE_PORT,
    WECOM_KEYS,
    Sandbox,
    Supervisor,
    _port_free,
    console_port,
    health_ports,
    model_label,
    read_dotenv,
    sandbox_wanted,
)
from wecombot.devlock import DataDirLock
from wecombot_common.errors import ConfigError


def test_console_port() -> None:
    assert console_port({"WECOMBOT_CONSOLE_PORT": "18090"}) == 18090
    assert console_port({"WECOMBOT_CONSOLE_PORT": "0"}) is None  # off


def test_the_default_console_port_falls_back_to_any_free_port_when_taken() -> None:
    with socket.socket() as holder:
        # A listener with SO_REUSEADDR, as a server holds it: a plain bind fails while
        # the port is in TIME_WAIT (a console tab closed a minute ago), which is free.
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", CONSOLE_PORT))
            holder.listen()
        except OSError:
            held_here = False  # another process holds it: taken all the same
        else:
            held_here = True
        assert console_port({}) == 0  # taken: any free port
    if not held_here:
        pytest.skip(f"port {CONSOLE_PORT} is held by another process: cannot free it")
    # Released: the default again.
    assert console_port({}) == CONSOLE_PORT


@pytest.mark.parametrize("raw", ["abc", "70000", "-1", "80.5"])
def test_a_malformed_console_port_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="WECOMBOT_CONSOLE_PORT must be a port number"):
        console_port({"WECOMBOT_CONSOLE_PORT": raw})


def test_model_label() -> None:
    assert model_label({}) == ("offline echo model (OPENAI_API_KEY unset)", True)
    assert model_label({"OPENAI_API_KEY": "sk"}) == ("gpt-4o-mini at api.openai.com", False)
    deepseek = {
        "OPENAI_API_KEY": "sk",
        "OPENAI_BASE_URL": "https://api.deepseek.com/v1",
        "OPENAI_MODEL": "deepseek-chat",
    }
    assert model_label(deepseek) == ("deepseek-chat at api.deepseek.com", False)
    # Printed, and sent to the console: never the password a proxy URL may carry.
    proxied = {"OPENAI_API_KEY": "sk", "OPENAI_BASE_URL": "https://acct:Pa55word@gw.corp:8443/v1"}
    assert model_label(proxied) == ("gpt-4o-mini at gw.corp:8443", False)


@pytest.mark.parametrize("argv", [["wecombot", "dev"], ["wecombot.dev"]], ids=["cli", "module"])
def test_a_health_port_for_three_services_is_refused_before_anything_starts(
    argv: list[str], tmp_path: Path
) -> None:
    """Both ways of starting it (the module as a script too) refuse WECOMBOT_HEALTH_PORT
    with the reason and exit 2, before any server is started."""
    env = {**os.environ, "WECOMBOT_HEALTH_PORT": "9000", "WECOMBOT_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "WECOMBOT_HEALTH_PORT=9000 would give llm, sender and token one port" in done.stdout


def test_a_data_dir_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    """It was a FileExistsError traceback."""
    taken = tmp_path / "data"
    taken.write_text("not a directory")
    env = {**os.environ, "WECOMBOT_DATA_DIR": str(taken), "WECOMBOT_CONSOLE_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "wecombot", "dev"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"WECOMBOT_DATA_DIR={taken} cannot be used: File exists" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_the_sandbox_runs_with_no_wecom_setting_as_in_a_copied_env_example() -> None:
    env: dict[str, str] = {}
    read_dotenv(Path(__file__).resolve().parents[2] / ".env.example", env)
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    assert all(f"\n{key}=\n" in example for key in WECOM_KEYS)  # named, empty
    assert sandbox_wanted(env)
    assert sandbox_wanted({})
    assert sandbox_wanted(dict.fromkeys(WECOM_KEYS, " "))  # blank is not given


def test_dotenv_values_read_as_written(tmp_path: Path) -> None:
    """A two-line welcome needs its escape read; a comment after a value is no part of
    it; a ``$`` in a secret stays; what is set already wins."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        'LLM_WELCOME_MESSAGE="欢迎使用！\\n发送 /help 查看命令"\n'
        "LLM_APOLOGY_MESSAGE=稍后再试 # 注释\n"
        "export NATS_PASSWORD='pa$$word # not a comment'\n"
        "OPENAI_MODEL=\n"
        "LOG_LEVEL=debug\n",
        encoding="utf-8",
    )
    env = {"LOG_LEVEL": "info"}
    read_dotenv(dotenv, env)
    assert env == {
        "LLM_WELCOME_MESSAGE": "欢迎使用！\n发送 /help 查看命令",
        "LLM_APOLOGY_MESSAGE": "稍后再试",
        "NATS_PASSWORD": "pa$$word # not a comment",
        "LOG_LEVEL": "info",
    }


def test_a_complete_wecom_app_is_used() -> None:
    assert not sandbox_wanted({key: "x" for key in WECOM_KEYS})


@pytest.mark.parametrize("unset", WECOM_KEYS)
def test_one_wecom_setting_missing_stops_start_up_naming_it(unset: str) -> None:
    env = {key: "x" for key in WECOM_KEYS} | {unset: ""}
    with pytest.raises(ValueError, match=rf"incomplete: {unset} unset") as info:
        sandbox_wanted(env)
    assert "none for the sandbox" in str(info.value)


def test_output_to_a_reader_that_went_away_does_not_stop_dev(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`make run | tee log` and Ctrl-C: tee may exit first. A BrokenPipeError out of say()
    or a child's output pump stopped the supervisor before it stopped the services."""
    read, write = os.pipe()
    os.close(read)
    broken = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", broken)
    Supervisor({}, DataDirLock(tmp_path)).say("stopping")  # no BrokenPipeError
    monkeypatch.undo()
    with contextlib.suppress(BrokenPipeError):
        broken.close()


def test_output_to_a_terminal_that_was_closed_does_not_stop_dev(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Closing the terminal (README: it stops as Ctrl-C does): every write to it fails
    with EIO, not EPIPE. An OSError out of say() ended the stop half-way ("llm did not
    stop in time"): the other services and the nats-server were left running, and dev
    hung for good waiting for the broker to exit."""
    master, slave = pty.openpty()
    os.close(master)  # the terminal is gone
    closed = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    Supervisor({}, DataDirLock(tmp_path)).say("llm did not stop in time: killing it")
    monkeypatch.undo()
    with contextlib.suppress(OSError):
        closed.close()


def test_a_port_whose_last_connection_is_in_time_wait_is_free() -> None:
    """An embedded nats-server that stopped leaves its side of closed connections in
    TIME_WAIT for a minute: 4222 was said taken, the next dev's broker went to another
    port, and the other commands could not find it."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server side closes first: its port goes to TIME_WAIT
        assert not _port_free(port)  # still listening
    client.close()
    assert _port_free(port)


def test_a_health_port_another_program_holds_is_replaced_by_a_free_one() -> None:
    """With 8081 taken, the llm could not listen, exited 2, and dev stopped everything;
    the only way round was WECOMBOT_HEALTH_PORT=0, which turned the metrics off."""
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        held, unused = str(taken.getsockname()[1]), str(free.getsockname()[1])
        free.close()
        ports = health_ports({}, {"llm": held, "sender": unused})
    assert ports["sender"] == unused
    assert ports["llm"] not in (held, "0") and int(ports["llm"]) > 0
    assert health_ports({"WECOMBOT_HEALTH_PORT": "0"}) == {}


def test_a_sandbox_is_written_whole_and_for_its_owner_only(tmp_path: Path) -> None:
    """Written then renamed (a file cut short held no app), readable by no one else (it
    holds the app's Secret, Token and key), and read back as made."""
    made = Sandbox.load_or_create(tmp_path / "data")
    path = tmp_path / "data" / "sandbox.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["sandbox.json"]  # no part left
    assert Sandbox.load_or_create(tmp_path / "data") == made
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sandbox\.json holds no sandbox app \(TypeError"):
        Sandbox.load_or_create(tmp_path / "data")
