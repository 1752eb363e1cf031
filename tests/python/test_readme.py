"""The README's Python section runs as written: its code blocks, in order,
in one namespace (each example continues the first)."""
import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")


def python_section_blocks():
    text = open(README, encoding="utf-8").read()
    start = text.index("\n## Python\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_the_readme_python_examples_run():
    blocks = python_section_blocks()
    assert len(blocks) >= 5, "the section lost its examples"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README python block {i + 1}", "exec"), namespace)
    namespace["engine"].shutdown()
    namespace["target"].shutdown()
