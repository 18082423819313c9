"""Mutation testing of mcad's pure core (`./dev.sh mutate`, mutmut 2.x; README "Tests").

Each core module is paired with the fast (non-Ray) test files that cover it, so
one mutant costs one short pytest run. mutmut imports this file from the
repository root: `pre_mutation` skips the mutants outside the parts of a module
under test (SCOPE); `python mutmut_config.py tests MODULE` prints a module's
test files (dev.sh reads the pairing from here).
"""
from __future__ import annotations

import ast
import sys

# module -> the test files that cover it
PAIRS = {
    "student/losses.py": ["tests/student/test_losses.py"],
    "student/targets.py": ["tests/student/test_targets.py"],
    "student/metrics.py": ["tests/student/test_metrics.py"],
    "pipeline/signals.py": ["tests/pipeline/test_signals.py"],
    "pipeline/projection.py": ["tests/pipeline/test_signals.py"],
    "storage/schema.py": ["tests/storage/test_schema.py", "tests/storage/test_writer.py",
                          "tests/storage/test_reader.py"],
    "storage/manifest.py": ["tests/storage/test_writer.py", "tests/storage/test_reader.py",
                            "tests/storage/test_integrity.py"],
    # test_fs.py: the same checks on a store at a URI (pyarrow's in-memory mock://)
    "storage/reader.py": ["tests/storage/test_reader.py", "tests/storage/test_integrity.py",
                          "tests/storage/test_fs.py"],
    "storage/parquet_files.py": ["tests/storage/test_reader.py", "tests/storage/test_integrity.py",
                                 "tests/storage/test_fs.py"],
}

# Modules mutated only in part: the functions (and methods, as Class.method) under test.
# signals.py: its maths, not the streaming or the timing; projection.py: its maths, not the file I/O;
# reader.py: its checks, not the replay iterators.
SCOPE = {
    "pipeline/signals.py": {
        "pools", "dual_logits", "candidates", "gather_padded", "candidate_columns",
        "single_pass", "_pool_signals", "_to_numpy",
    },
    "pipeline/projection.py": {
        "projection_target", "fit_projection", "project", "calibration_pairs",
    },
    "storage/reader.py": {
        "open_store", "_check_shard", "fingerprint_digest", "Store.has_digests",
        "Store.file_where", "Store.verify_files", "Store.verify_file", "Store.verify_projection",
    },
}

_owners: dict[str, dict[int, str]] = {}
_raises: dict[str, set[int]] = {}


def _line_owners(filename: str) -> dict[int, str]:
    """1-based line -> the top-level function or Class.method that holds it."""
    if filename not in _owners:
        with open(filename) as f:
            tree = ast.parse(f.read())
        owners: dict[int, str] = {}

        def mark(node: ast.AST, name: str) -> None:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            for line in range(first, node.end_lineno + 1):
                owners[line] = name

        _raises[filename] = {line for node in ast.walk(tree) if isinstance(node, ast.Raise)
                             for line in range(node.lineno, node.end_lineno + 1)}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                mark(node, node.name)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        mark(item, f"{node.name}.{item.name}")
        _owners[filename] = owners
    return _owners[filename]


def pre_mutation(context) -> None:
    """Skip a mutant outside its module's SCOPE, or inside a `raise` statement.

    The lines of a raise hold only the error's message (the condition that raises is on the
    line above): mutmut's edits there ("XX" around the text) change wording, not behaviour,
    and the tests match messages by their parts.
    """
    line = context.current_line_index + 1
    owners = _line_owners(context.filename)
    if line in _raises[context.filename]:
        context.skip = True
        return
    scope = SCOPE.get(context.filename.replace("\\", "/").removeprefix("./"))
    if scope is not None and owners.get(line) not in scope:
        context.skip = True


# mutmut's statuses, as `dev.sh mutate` names them; all but killed and skipped need a look
STATUSES = {"ok_killed": "killed", "bad_survived": "survived", "bad_timeout": "timeout",
            "ok_suspicious": "suspicious", "skipped": "skipped", "untested": "untested"}


def _statuses(module: str) -> list[tuple[int, str]]:
    """(mutant id, status) of a module's mutants in mutmut's cache (.mutmut-cache, SQLite)."""
    import sqlite3

    with sqlite3.connect(".mutmut-cache") as db:
        return list(db.execute(
            'SELECT m.id, m.status FROM Mutant m JOIN Line l ON m.line = l.id '
            'JOIN SourceFile f ON l.sourcefile = f.id WHERE f.filename = ? ORDER BY m.id', (module,)))


def main(argv: list[str]) -> None:
    usage = f"usage: mutmut_config.py modules | tests|counts|left MODULE (one of: {', '.join(PAIRS)})"
    if argv == ["modules"]:
        print(" ".join(PAIRS))
        return
    if len(argv) != 2 or argv[1] not in PAIRS:
        sys.exit(usage)
    what, module = argv
    if what == "tests":
        print(" ".join(PAIRS[module]))
    elif what == "counts":
        rows = _statuses(module)
        counts = {name: sum(s == status for _, s in rows) for status, name in STATUSES.items()}
        print(f"{len(rows)} mutants: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n))
    elif what == "left":
        print(" ".join(f"{i}:{STATUSES[s]}" for i, s in _statuses(module) if s not in ("ok_killed", "skipped")))
    else:
        sys.exit(usage)


if __name__ == "__main__":
    main(sys.argv[1:])
