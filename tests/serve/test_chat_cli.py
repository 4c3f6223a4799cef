"""`lmforge chat`, driven through stdin: history, /reset, /system, /exit, streaming, context
trimming, and the real command line in a subprocess."""

import io
import os
import subprocess
import sys

import pytest

from lmforge.errors import LMForgeError
from lmforge.serve.chat_cli import ChatSession, run_chat
from lmforge.serve.engine import Engine, GenParams
from tests.factories import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "chatty", max_seq_len=128)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch=1).start()
    yield eng
    eng.close()


class Recorder:
    """Records the prompts the engine receives."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []
        self._submit = engine.submit

    def __enter__(self):
        def submit(ids, params=None, **kw):
            self.prompts.append(self.engine.tok.decode(ids))
            return self._submit(ids, params, **kw)

        self.engine.submit = submit
        return self

    def __exit__(self, *exc):
        del self.engine.submit


def chat(engine, lines, **kw):
    out = io.StringIO()
    rc = run_chat(
        engine,
        GenParams(max_tokens=6, temperature=0),
        stdin=io.StringIO("".join(l + "\n" for l in lines)),
        stdout=out,
        **kw,
    )
    return rc, out.getvalue()


def test_history_reset_system_and_exit(engine):
    with Recorder(engine) as rec:
        rc, out = chat(
            engine,
            [
                "first question",
                "second question",
                "/history",
                "/reset",
                "third",
                "/system You are a pirate.",
                "fourth",
                "/exit",
                "never sent",
            ],
        )
    assert rc == 0
    assert len(rec.prompts) == 4
    # history is kept: the second prompt contains the first exchange
    assert "first question" in rec.prompts[1] and "second question" in rec.prompts[1]
    assert rec.prompts[1].count("<|assistant|>") == 2
    # /reset forgets it
    assert "first question" not in rec.prompts[2]
    # /system sets a system prompt (and resets)
    assert "<|system|>\nYou are a pirate.<|end|>" in rec.prompts[3] and "third" not in rec.prompts[3]
    assert "never sent" not in out
    assert "user: first question" in out and "[conversation cleared]" in out
    assert out.count("assistant> ") == 4


def test_streams_the_same_text_the_engine_produces(engine):
    _, out = chat(engine, ["hello"])
    expected = engine.complete(
        engine.encode_chat([{"role": "user", "content": "hello"}]), GenParams(max_tokens=6, temperature=0)
    ).text
    assert f"assistant> {expected}\n" in out


def test_eof_ends_the_chat_and_unknown_commands_are_explained(engine):
    rc, out = chat(engine, ["/frobnicate"])
    assert rc == 0 and "unknown command /frobnicate" in out


def test_long_conversations_drop_the_oldest_turns(engine):
    with Recorder(engine) as rec:
        _, out = chat(engine, [f"message number {i} " + "padding " * 12 for i in range(8)])
    assert "dropped the" in out
    assert all(len(engine.tok.encode(p)) <= engine.context for p in rec.prompts)
    assert "message number 0" not in rec.prompts[-1] and "message number 7" in rec.prompts[-1]


def test_a_message_longer_than_the_context_is_an_error_not_a_crash(engine):
    rc, out = chat(engine, ["word " * 400, "short"])
    assert rc == 0 and "error:" in out and "context" in out
    assert out.count("assistant> ") == 2


def test_model_without_chat_template_is_refused(engine):
    from lmforge.serve.engine import Engine as E

    plain = E(engine.model, engine.tok, chat_format=None)
    with pytest.raises(LMForgeError, match="chat template"):
        ChatSession(plain, GenParams())


def test_chat_command_line_via_stdin(model_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.serve.cli",
            "chat",
            str(model_dir),
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--system",
            "Be brief.",
        ],
        input="hi there\n/reset\nagain\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lmforge chat with chatty" in proc.stdout
    assert proc.stdout.count("assistant> ") == 2 and "[conversation cleared]" in proc.stdout


def test_bad_sampling_flag_is_a_one_line_error(model_dir, capsys):
    from lmforge.serve.cli import main

    assert main(["chat", str(model_dir), "--top-p", "7"]) == 2
    err = capsys.readouterr().err
    assert "top_p" in err and "Traceback" not in err
    assert main(["serve", str(model_dir), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk" in capsys.readouterr().err


class CtrlC(io.StringIO):
    def readline(self, *a):
        raise KeyboardInterrupt


def test_ctrl_c_at_the_prompt_exits_cleanly(engine):
    out = io.StringIO()
    assert run_chat(engine, GenParams(max_tokens=4), stdin=CtrlC(), stdout=out) == 0
    assert out.getvalue().endswith("you> \n") and "resume" not in out.getvalue()
