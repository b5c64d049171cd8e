"""Copying a method file works as its docstring says.

Every method's docstring has a "Copy with: uda/a.py, uda/b.py" line. For each method, the method file and
exactly those files go into an empty folder as a package `uda/`, and `import uda.<method>` must work there
with nothing of this repository on the path; the listed files must also all be needed (the import loads
each of them), so the line is neither short nor padded.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from uda.methods import METHODS

# Python code run in the copy: import the method, report which uda modules the import loaded.
PROBE = ("import json, sys, uda.{name}; "
         "print(json.dumps([uda.__file__, sorted(m for m in sys.modules if m.startswith('uda.') and m != 'uda.{name}')]))")


def copy_with(method):
    """The files the method's docstring lists after "Copy with:", up to the first sentence end or '('."""
    path = os.path.join(REPO, "uda", f"{method}.py")
    doc = open(path).read().split('"""')[1]
    match = re.search(r"Copy with:(.*?)(?:\(|\.\s|\.$|\n\n)", doc, flags=re.S)
    assert match, f"uda/{method}.py: no 'Copy with:' line in the docstring"
    return re.findall(r"uda/(\w+)\.py", match.group(1))


def test_copy_with_line_is_parsed():
    """The parser reads the list and stops where the explanation starts (a failing parser passes anything)."""
    assert copy_with("source_only") == ["common"]
    assert copy_with("sdca") == ["common", "augment", "source_only"]  # not the `init` command's files
    assert "mit" in copy_with("daformer") and "models" in copy_with("daformer")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_imports_with_only_its_copy_with_files(method, tmp_path):
    listed = copy_with(method)
    package = tmp_path / "uda"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in [method, *listed]:
        shutil.copy(os.path.join(REPO, "uda", f"{name}.py"), package / f"{name}.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    # -I would also drop site-packages (torch); -s drops only the user site. cwd puts the copy first.
    result = subprocess.run([sys.executable, "-s", "-c", PROBE.format(name=method)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"uda/{method}.py with {listed}:\n{result.stderr}"
    package_file, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert package_file == str(package / "__init__.py"), f"imported the repository's uda, not the copy: {package_file}"
    assert sorted(f"uda.{name}" for name in listed) == loaded, f"uda/{method}.py lists {listed}, imports {loaded}"


def test_code_cites_no_notes_outside_the_repository():
    """A reader who copied the repository can follow every citation: no path into notes it does not hold.
    (uda/bench/ is covered once its own citations are fixed.)"""
    files = [os.path.join(REPO, "uda", name) for name in os.listdir(os.path.join(REPO, "uda")) if name.endswith(".py")]
    files += [os.path.join(REPO, name) for name in ("train.py", "evaluate.py")]
    offending = [f"{os.path.relpath(path, REPO)}:{number}" for path in files
                 for number, line in enumerate(open(path), start=1) if "shared/reference" in line]
    assert not offending, offending
