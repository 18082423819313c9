"""Fault matrix, security (issue #8): a scan of the product sources and two live checks.

No pickle on any load path (safetensors; `torch.load` only with
`weights_only=True`; a pickled payload beside or instead of the weights is never
run), `trust_remote_code` never true, Pillow's bomb limit untouched, tar members
never extracted. That a tar member's name is never used as a path, through a
whole teacher pass, is tests/jobs/test_fault_inputs.py.

    ./dev.sh test tests/jobs/test_fault_security.py
"""
from __future__ import annotations

import ast
import importlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


PRODUCT_PACKAGES = ("mcad.storage", "mcad.student", "mcad.pipeline", "mcad.jobs")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _product_sources():
    """(path, syntax tree) of every module of the four packages, found where they are imported from."""
    for package in PRODUCT_PACKAGES:
        folder = Path(importlib.import_module(package).__file__).parent
        for path in sorted(folder.rglob("*.py")):
            yield f"{package}/{path.relative_to(folder).as_posix()}", ast.parse(path.read_text(), str(path))


def test_the_scan_reads_every_product_module():
    scanned = {rel for rel, _ in _product_sources()}
    for module in ("mcad.storage/reader.py", "mcad.student/checkpoint.py", "mcad.pipeline/teachers.py",
                   "mcad.jobs/teacher_pass.py", "mcad.jobs/cli/__init__.py", "mcad.pipeline/shapes/bootstrap.py"):
        assert module in scanned


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _callee(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _functions(tree):
    """(enclosing function name, node) for every node."""
    def walk(node, fn):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            yield name, child
            yield from walk(child, name)
    yield from walk(tree, "")


def test_no_pickle_and_no_remote_code_on_any_load_path():
    problems = []
    for rel, tree in _product_sources():
        for fn, node in _functions(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                callee = _callee(node)
                if callee == "torch.load" and _kw(node, "weights_only") is not True:
                    problems.append(f"{where} torch.load without weights_only=True")
                if callee.endswith(("np.load", "numpy.load")) and _kw(node, "allow_pickle") not in (None, False):
                    problems.append(f"{where} np.load with allow_pickle")
                if callee.endswith(("read_pickle", ".extract", ".extractall")):
                    problems.append(f"{where} calls {callee}")
                if any(kw.arg == "trust_remote_code" for kw in node.keywords) and \
                        _kw(node, "trust_remote_code") is not False:
                    problems.append(f"{where} trust_remote_code is not False")
                model_load = callee.endswith(".from_pretrained") and not any(
                    s in callee for s in ("Processor", "Tokenizer", "Config"))
                if model_load and _kw(node, "use_safetensors") is not True:
                    problems.append(f"{where} {callee} without use_safetensors=True")
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "MAX_IMAGE_PIXELS" for t in targets):
                    problems.append(f"{where} changes Pillow's MAX_IMAGE_PIXELS")
    assert problems == []


def test_pillow_bomb_limit_is_in_force_after_every_import():
    code = ("import importlib, pkgutil\nfrom PIL import Image\ndefault = Image.MAX_IMAGE_PIXELS\n"
            f"for pkg in {PRODUCT_PACKAGES!r}:\n"
            "    mod = importlib.import_module(pkg)\n"
            "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "assert default and Image.MAX_IMAGE_PIXELS == default, Image.MAX_IMAGE_PIXELS\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    # The limit itself (and ours below it) rejecting real bombs: tests/pipeline/test_shards.py
    # test_image_over_pixel_limit / test_decompression_bomb_is_checked_from_the_header, and the
    # "image over the pixel limit" input case of tests/jobs/test_fault_inputs.py, through the whole pass.


class _Payload:
    """Unpickling this creates the file it names: proof that a load ran pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_payloads_are_never_unpickled(tiny_teachers, tmp_path):
    import torch

    from mcad.pipeline.teachers import DualTeacher
    from mcad.storage.errors import InputError
    from mcad.student.checkpoint import load_checkpoint
    from mcad.student.models import build_student

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live
    assert probe.exists()
    mark = tmp_path / "unpickled"

    # A teacher folder holding a pickled checkpoint: with safetensors beside it the
    # safetensors load; alone, the folder is refused.
    teacher = tmp_path / "dual"
    shutil.copytree(tiny_teachers[0], teacher)
    torch.save(_Payload(mark), teacher / "pytorch_model.bin")
    DualTeacher.load(teacher)
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(InputError, match="no safetensors weights"):
        DualTeacher.load(teacher)

    # A student checkpoint whose optimiser state is a pickle payload.
    student, _ = build_student("smoke", tokenizer_from=tiny_teachers[0], teacher_dim=8, seed=0)
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, last / "student.safetensors")
    (last / "state.json").write_text('{"epoch": 0, "step": 1}')
    torch.save(_Payload(mark), last / "optimizer.pt")
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "checkpoints", model=student, optimizer=optimizer)
    assert not mark.exists()
