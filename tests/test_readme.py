"""README.md's code runs as written: every ```python block that starts with an import is a
complete program (the others are fragments: `from_pretrained` needs a download, `pipe` comes
from the block before) and is executed here, on CPU."""
import os
import re

import pytest

pytest.importorskip("diffusers")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
if not os.path.isfile(README):                    # tests copied beside an installed wheel
    pytest.skip("README.md is in the source tree", allow_module_level=True)


def _programs():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return [b for b in blocks if b.lstrip().startswith(("import ", "from "))
            and "from_pretrained" not in b]


@pytest.mark.parametrize("code", _programs(), ids=lambda c: c.splitlines()[0][:40])
def test_readme_program_runs(code):
    namespace = {}
    exec(compile(code, README, "exec"), namespace)     # noqa: S102 - the README's own code
    if "x0" in namespace and "table" in namespace:     # the sampling loop ran every step
        import torch

        assert torch.isfinite(namespace["x"]).all()
