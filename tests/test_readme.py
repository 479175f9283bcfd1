"""The README's Python examples run as written against a real server serving the bundled models
(only the target changes)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MODELS = README.parent / "models"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


async def test_readme_python_examples_run(start_server, samples, model_dir):
    if model_dir.resolve() != (MODELS / "basicmotions").resolve():
        pytest.skip("the README's examples are written for the bundled models")
    app, port = await start_server(model_dir="")  # the bundled models, basicmotions the default
    with np.load(MODELS / "japanesevowels" / "samples.npz") as vowels:
        vowel = vowels["x"][0][: int(vowels["lengths"][0])]
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        namespace = {
            "recording": samples["x"][0][:12],
            "rec_a": samples["x"][1][:30],
            "rec_b": samples["x"][2][:7],
            "vowels": vowel,
        }
        code = code.replace("localhost:50051", f"127.0.0.1:{port}")
        code = code.replace("localhost:8000", f"127.0.0.1:{app.http_port}")
        # The in-process server shares this event loop, so the example runs on another thread.
        await asyncio.to_thread(exec, compile(code, "README.md", "exec"), namespace)
