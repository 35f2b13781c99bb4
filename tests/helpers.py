"""What tests share: a handful of examples and tiny random LMs built in code (no download)."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import ModelConfig, PromptConfig
from pipeline.data.example import Example
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.lm.loader import load_model
from pipeline.lm.template import PromptTemplate

REPO = Path(__file__).resolve().parent.parent

EXAMPLES = [
    Example("a", "add two numbers `a` and `b`", "a + b"),
    Example("b", "reverse the list `xs`", "xs[::-1]"),
    Example("c", "sort dict `d` by value", "sorted(d.items(), key=lambda kv: kv[1])"),
    Example("d", "join words with commas", "', '.join(words)", input="words = ['x', 'y']"),
    Example("e", "read file `f` into a string", "open(f).read()"),
    Example("f", "square each item", "[x * x for x in items]"),
]


def make_lm(name: str, template: str = "auto", **prompt) -> FrozenCodeLM:
    model, tokenizer = load_model(ModelConfig(name=name))
    config = PromptConfig(template=template, max_source_tokens=96, max_target_tokens=24, **prompt)
    return FrozenCodeLM(model, tokenizer,
                        PromptTemplate(tokenizer, config,
                                       is_encoder_decoder=model.config.is_encoder_decoder))


def shared_data_dir() -> Path:
    """The data folder tests read: ``$DDPT_DATA_DIR``, else ``../shared/data`` beside the clone
    (where CI puts it)."""
    return Path(os.environ.get("DDPT_DATA_DIR") or REPO.parent / "shared" / "data")


DREAM_FIXTURES = shared_data_dir() / "dream-fixtures"


def run_in_terminal(command: list[str], timeout: float = 900, columns: int = 120,
                    env: dict | None = None) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal (``columns`` wide) as stdin, stdout and stderr, as
    a user's shell would; returns (exit code, everything it printed)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline, quiet_since = [], time.monotonic() + timeout, None
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{command} ran over {timeout}s")
            ready, _, _ = select.select([master], [], [], 0.5)
            data = b""
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                chunks.append(data)
            if proc.poll() is not None and not data:  # exited; a child may hold the pty
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 2:
                    break
    finally:
        os.close(master)
        proc.wait()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (screenshots): ``$DDPT_TEST_ARTIFACTS``,
    else ``<repo>/test-artifacts`` (git-ignored; CI keeps it)."""
    return Path(os.environ.get("DDPT_TEST_ARTIFACTS") or REPO / "test-artifacts")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_uri: str, artifacts: Path, cwd: Path, log=None,
                        env: dict | None = None, timeout: float = 120):
    """``mlflow server`` on a free loopback port (its own process group, artifacts served from
    ``artifacts``), once it answers ``/health``; returns (process, base URL). Stopping it is
    the caller's (``os.killpg(process.pid, ...)``)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(artifacts)],
        cwd=cwd, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, base
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            if server.poll() is None:
                os.killpg(server.pid, 9)
                server.wait()
            raise RuntimeError(f"mlflow server did not answer /health in {timeout:.0f} s "
                               f"(exit code {server.poll()})")
        time.sleep(0.5)


def load_local_nodes():
    """``cluster/local_nodes.py`` (the two-node cluster helper; cluster/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_nodes",
                                                  REPO / "cluster" / "local_nodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(folder: Path, step: int = 0, **denoiser) -> Path:
    """A real DDPT checkpoint of the smoke configuration (``denoiser`` fields changed), built
    without an LM (n=4, d=32) and saved as training saves one, in milliseconds."""
    import dataclasses

    from pipeline.config import PRESETS, RunConfig
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.prompt_models import PROMPT_MODELS, LMFacts

    config = RunConfig.from_dict(PRESETS["smoke"])
    config.denoiser = dataclasses.replace(config.denoiser, **denoiser)
    model = PROMPT_MODELS["ddpt"].build(config, LMFacts(4, 32, 1.0))
    return save_checkpoint(folder, model, config, step=step)


# how a checkpoint file gets damaged -> (the file, what the error says of it)
CHECKPOINT_DAMAGE = {
    "truncated": ("model.safetensors", "not a complete safetensors file"),
    "empty": ("model.safetensors", "not a complete safetensors file"),
    "malformed": ("state.json", "not valid JSON"),
    "missing_field": ("state.json", "field 'hidden_size' is missing"),
    "wrong_type": ("state.json", "field 'step': got '3', expected an integer >= 0"),
}


def damage_checkpoint(folder: Path, how: str) -> Path:
    """Damage one file of a checkpoint as a cut-short copy or a careless edit would (a key of
    CHECKPOINT_DAMAGE); returns the damaged file."""
    import json

    file = folder / CHECKPOINT_DAMAGE[how][0]
    if how in ("truncated", "empty"):
        file.write_bytes(file.read_bytes()[:-100] if how == "truncated" else b"")
    elif how == "malformed":
        file.write_text('{"step": 3, "context_tokens": ')
    else:
        state = json.loads(file.read_text())
        if how == "missing_field":
            del state["hidden_size"]
        else:
            state["step"] = "3"
        file.write_text(json.dumps(state))
    return file
