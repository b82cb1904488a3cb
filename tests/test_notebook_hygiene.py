"""Static checks on every committed notebook under ``notebooks/`` (no kernel is started).

The conventions (see the notebooks' own first cells and ``tests/test_notebooks.py``):

* kernelspec ``python3`` shown as the name ``make setup`` installs; the first cell is markdown with a ``# Title``;
* the second cell is the papermill ``parameters`` cell (tag ``parameters``) and holds literal assignments only,
  including ``SMOKE``; derived values live in the third cell, which reads ``NCA_KIT_SMOKE`` and sets ``OUT = out_dir()``;
* stored outputs: no errors, no machine paths, no memory addresses, no timings, no execution metadata; execution
  counts strictly increasing in cell order (a GPU-only notebook may instead be stored without any outputs);
* ``metadata["nca_kit"]``, if present, is ``{"nbval": "strict" | "lax", "requires_gpu": bool}``.

Each check returns a list of problems, so a failure names all of them; the checks are themselves tested on a
notebook that breaks every rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(
    r"(/work/|/tmp/|/root/|/home/|/Users/|/mnt/|/private/|/var/folders/|/opt/conda|site-packages|"
    r"\b[A-Za-z]:\\)")
MEMORY_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
TIMING = re.compile(r"(Wall time|CPU times|\d+(\.\d+)?\s*(it/s|s/it)\b|elapsed\s*[:=]?\s*\d)", re.IGNORECASE)
TEXT_MIMETYPES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def _output_texts(cell):
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            yield output.text
        elif output.output_type in ("display_data", "execute_result"):
            for mimetype in TEXT_MIMETYPES:
                if mimetype in output.data:
                    yield str(output.data[mimetype])
        elif output.output_type == "error":
            yield "\n".join(output.get("traceback", []))


def installed_display_name() -> str:
    """The kernel display name ``make setup`` installs (``ipykernel install --display-name ...`` in the Makefile):
    a stored notebook with another one changes on its first save in JupyterLab, a diff for every student."""
    match = re.search(r'--display-name "([^"]+)"', (REPO / "Makefile").read_text())
    assert match, "the Makefile's setup target installs the kernel with --display-name"
    return match.group(1)


def check_structure(nb) -> list[str]:
    problems = []
    kernelspec = nb.metadata.get("kernelspec", {})
    if kernelspec.get("name") != "python3":
        problems.append(f"kernelspec name is {kernelspec.get('name')!r}, not 'python3'")
    if kernelspec.get("display_name") != installed_display_name():
        problems.append(f"kernelspec display_name is {kernelspec.get('display_name')!r}, not "
                        f"{installed_display_name()!r} (the kernel make setup installs)")
    cells = nb.cells
    if len(cells) < 3:
        return problems + [f"only {len(cells)} cells: need title, parameters and setup cells"]
    if cells[0].cell_type != "markdown" or not re.search(r"^# \S", cells[0].source, re.MULTILINE):
        problems.append("first cell must be markdown with a '# Title' line")
    problems += check_parameters_cell(cells[1])
    for i, cell in enumerate(cells[2:], start=2):
        if "parameters" in cell.metadata.get("tags", []):
            problems.append(f"cell {i} is also tagged 'parameters': only the second cell may be")
    setup = cells[2]
    if setup.cell_type != "code":
        problems.append("third cell must be the code cell of derived values")
    else:
        if "NCA_KIT_SMOKE" not in setup.source:
            problems.append("third cell must read the environment variable NCA_KIT_SMOKE")
        if not re.search(r"^OUT = out_dir\(\)", setup.source, re.MULTILINE):
            problems.append("third cell must set OUT = out_dir() (nca_kit.paths: NCA_KIT_OUT, else the checkout's "
                            "runs/lab, wherever the notebook is opened)")
    return problems


def check_parameters_cell(cell) -> list[str]:
    if cell.cell_type != "code" or "parameters" not in cell.metadata.get("tags", []):
        return ["second cell must be a code cell tagged 'parameters'"]
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as error:
        return [f"parameters cell does not parse: {error}"]
    problems, names = [], set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(
            node, "target", None) if isinstance(node, ast.AnnAssign) else None
        value = getattr(node, "value", None)
        if not isinstance(target, ast.Name) or value is None:
            problems.append(f"parameters cell line {node.lineno}: only 'NAME = literal' assignments are allowed")
            continue
        try:
            ast.literal_eval(value)
        except ValueError:
            problems.append(f"parameters cell: {target.id} is not assigned a literal (derive it in the next cell)")
        names.add(target.id)
    if "SMOKE" not in names:
        problems.append("parameters cell must define SMOKE")
    return problems


def check_outputs(nb) -> list[str]:
    problems = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, cell in enumerate(nb.cells):
        for match in MACHINE_PATH.finditer(cell.source):
            problems.append(f"cell {i} source holds a machine path: {match.group(0)!r}")
        for key in ("execution", "papermill"):
            if key in cell.metadata:
                problems.append(f"cell {i} metadata holds {key!r} (timings); store with run_notebooks.py --store")
    for i, cell in code:
        for output in cell.outputs:
            if output.output_type == "error":
                problems.append(f"cell {i} has a stored error output ({output.get('ename')})")
        for text in _output_texts(cell):
            for pattern, what in ((MACHINE_PATH, "a machine path"), (MEMORY_ADDRESS, "a memory address"),
                                  (TIMING, "a timing")):
                match = pattern.search(text)
                if match:
                    problems.append(f"cell {i} output holds {what}: {match.group(0)!r}")
    if "papermill" in nb.metadata:
        problems.append("notebook metadata holds 'papermill' (paths and timings); store with --store")

    counts = [c.execution_count for _, c in code]
    unexecuted_gpu = (nb.metadata.get("nca_kit", {}).get("requires_gpu") is True
                      and all(n is None for n in counts) and not any(c.outputs for _, c in code))
    if not unexecuted_gpu:
        if any(n is None for n in counts):
            missing = [i for i, c in code if c.execution_count is None]
            problems.append(f"code cells {missing} have no execution count: store the notebook executed top to "
                            f"bottom (python scripts/run_notebooks.py --store NAME)")
        present = [n for n in counts if n is not None]
        if any(b <= a for a, b in zip(present, present[1:])):
            problems.append(f"execution counts are not strictly increasing: {counts}")
    return problems


def check_metadata(nb) -> list[str]:
    meta = nb.metadata.get("nca_kit")
    if meta is None:
        return []
    problems = []
    if not isinstance(meta, dict):
        return [f"metadata nca_kit must be a dict, got {type(meta).__name__}"]
    unknown = set(meta) - {"nbval", "requires_gpu"}
    if unknown:
        problems.append(f"metadata nca_kit has unknown keys {sorted(unknown)}")
    if meta.get("nbval", "lax") not in ("strict", "lax"):
        problems.append(f"metadata nca_kit.nbval must be 'strict' or 'lax', got {meta['nbval']!r}")
    if not isinstance(meta.get("requires_gpu", False), bool):
        problems.append("metadata nca_kit.requires_gpu must be true or false")
    return problems


def all_problems(nb) -> list[str]:
    return check_structure(nb) + check_outputs(nb) + check_metadata(nb)


def test_notebook_hygiene(notebook_path):
    nb = nbformat.read(str(notebook_path), as_version=4)
    problems = all_problems(nb)
    assert not problems, f"{notebook_path.name}:\n  " + "\n  ".join(problems)


def test_papermill_infers_every_parameter(notebook_path, caplog):
    """``papermill --help-notebook`` lists each parameter with its comment; a line it cannot parse (e.g. an ``=``
    inside the comment) is dropped from that help with only a log warning."""
    import logging

    from papermill.inspection import inspect_notebook

    nb = nbformat.read(str(notebook_path), as_version=4)
    assigned = [t.id for node in ast.parse(nb.cells[1].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    with caplog.at_level(logging.WARNING):
        inferred = inspect_notebook(str(notebook_path))
    assert list(inferred) == assigned, [r.getMessage() for r in caplog.records]
    assert all(p["help"] for p in inferred.values()), "every parameter needs a '# what it does' comment"


# --------------------------------------------------------------------------------------------------------------------
# The checks catch what they claim to catch.
# --------------------------------------------------------------------------------------------------------------------


def _good_notebook():
    cells = [new_markdown_cell("# A lecture\n\nWhat you will see."),
             new_code_cell("SMOKE = False  # switch\nN = 3\nALPHA = -0.5\nNAMES = ['a', 'b']", execution_count=1),
             new_code_cell("import os\nSMOKE = SMOKE or os.environ.get('NCA_KIT_SMOKE') == '1'\n"
                           "OUT = out_dir()", execution_count=2),
             new_code_cell("print(N)", execution_count=3,
                           outputs=[new_output("stream", name="stdout", text="3\n")])]
    cells[1].metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": installed_display_name(), "language": "python"}
    nb.metadata["nca_kit"] = {"nbval": "strict", "requires_gpu": False}
    return nb


def test_checks_accept_a_clean_notebook():
    assert all_problems(_good_notebook()) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda nb: nb.metadata.kernelspec.update(name="conda-env"), "kernelspec"),
    (lambda nb: nb.metadata.kernelspec.update(display_name="Python 3"), "display_name"),
    (lambda nb: setattr(nb.cells[0], "source", "Just text"), "Title"),
    (lambda nb: nb.cells[1].metadata.update(tags=[]), "tagged 'parameters'"),
    (lambda nb: setattr(nb.cells[1], "source", "SMOKE = False\nN = len('abc')"), "not assigned a literal"),
    (lambda nb: setattr(nb.cells[1], "source", "SMOKE = False\nimport os"), "only 'NAME = literal'"),
    (lambda nb: setattr(nb.cells[1], "source", "N = 3"), "must define SMOKE"),
    (lambda nb: setattr(nb.cells[2], "source", "OUT = 'runs'"), "NCA_KIT_SMOKE"),
    (lambda nb: setattr(nb.cells[2], "source", "import os\nSMOKE = os.environ.get('NCA_KIT_SMOKE')\nOUT = 'runs'"),
     "out_dir"),
    (lambda nb: nb.cells[3].outputs.append(new_output("error", ename="ValueError", evalue="x", traceback=[])),
     "stored error"),
    (lambda nb: setattr(nb.cells[3].outputs[0], "text", "saved to /home/me/runs/a.png\n"), "machine path"),
    (lambda nb: setattr(nb.cells[3], "source", "open('/work/main/data.csv')"), "machine path"),
    (lambda nb: setattr(nb.cells[3].outputs[0], "text", "<object at 0x7f3a9c2b1d60>\n"), "memory address"),
    (lambda nb: setattr(nb.cells[3].outputs[0], "text", "CPU times: user 3 s\n"), "timing"),
    (lambda nb: nb.cells[3].metadata.update(execution={"iopub.status.busy": "2024"}), "timings"),
    (lambda nb: setattr(nb.cells[3], "execution_count", 2), "strictly increasing"),
    (lambda nb: setattr(nb.cells[2], "execution_count", None), "no execution count"),
    (lambda nb: nb.metadata.nca_kit.update(nbval="sometimes"), "nca_kit.nbval"),
    (lambda nb: nb.metadata.update(papermill={"input_path": "x"}), "papermill"),
])
def test_checks_catch_each_violation(breakage, expected):
    nb = _good_notebook()
    breakage(nb)
    problems = all_problems(nb)
    assert any(expected in p for p in problems), problems


def test_gpu_only_notebook_may_be_stored_unexecuted():
    nb = _good_notebook()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count, cell.outputs = None, []
    assert any("no execution count" in p for p in all_problems(nb))
    nb.metadata.nca_kit["requires_gpu"] = True
    assert all_problems(nb) == []
