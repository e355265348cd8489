"""The ```python examples in docs/python.md run as written (``py`` blocks are snippets)."""

import os
import re

import pytest
import torch

spattn = pytest.importorskip("spattn")
if not hasattr(spattn, "_C"):
    pytest.skip("the spattn extension is not built", allow_module_level=True)

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "python.md")
BLOCKS = re.findall(r"^```python\n(.*?)^```", open(DOC).read(), flags=re.S | re.M)


def test_there_are_examples():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, capsys):
    torch.manual_seed(0)
    torch._dynamo.reset()
    exec(compile(BLOCKS[index], f"docs/python.md example {index}", "exec"), {})
