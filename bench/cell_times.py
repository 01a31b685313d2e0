"""Where a chapter's time goes under ``pytest --nbmake``: a pytest plugin that logs every cell as it runs.

    pytest -p bench.cell_times --nbmake book/11_fine_tuning.ipynb     # (repository root on sys.path)
    python bench/cell_times.py _build/gpu_check/cell_times.tsv        # each chapter's slowest cells

nbmake reports one time per notebook. With this plugin loaded, every code cell appends a line to
``$CELL_TIMES`` (default ``cell_times.tsv``) when it starts and another when it ends, from the process
that drives the kernel (each xdist worker, too), flushed at once: a run killed at its time limit still
says which cell it was in. Lines are ``notebook<TAB>cell index<TAB>started|seconds<TAB>first line``, and
after a cell that failed, ``<TAB>`` and the error's name (``DeadKernelError`` where SIGINT stopped the run).
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import time

import nbclient
import nbmake.nb_run

_notebook = "?"  # the notebook this process runs now (an xdist worker runs one at a time)


def _log(path: str, *fields) -> None:
    line = "\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields)
    with open(path, "a") as f:  # a line per write, short: concurrent workers do not interleave
        f.write(line + "\n")


def _first_line(source: str) -> str:
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    return lines[0][:80] if lines else ""


def _timed(execute_cell, path: str):
    @functools.wraps(execute_cell)
    async def timed_execute_cell(self, cell, cell_index, *args, **kwargs):
        if cell.cell_type != "code":
            return await execute_cell(self, cell, cell_index, *args, **kwargs)
        notebook, first = _notebook, _first_line(cell.source)
        _log(path, notebook, cell_index, "started", first)
        start = time.perf_counter()
        # A cell that fails or times out ends with the error's name; so does one stopped by SIGINT at the
        # budget, which reaches the kernel too (DeadKernelError). A task cancelled here (not an
        # Exception) leaves no end line: the summary says "not finished".
        try:
            result = await execute_cell(self, cell, cell_index, *args, **kwargs)
        except Exception as error:
            name = getattr(error, "ename", "") or type(error).__name__  # ename: the kernel's exception
            _log(path, notebook, cell_index, f"{time.perf_counter() - start:.1f}", first, name)
            raise
        _log(path, notebook, cell_index, f"{time.perf_counter() - start:.1f}", first)
        return result

    return timed_execute_cell


def _named(execute):
    @functools.wraps(execute)
    def named_execute(self, *args, **kwargs):
        global _notebook
        _notebook = os.path.splitext(os.path.basename(self.filename))[0]
        return execute(self, *args, **kwargs)

    return named_execute


def pytest_configure(config) -> None:
    """Wrap nbclient's cell execution and nbmake's notebook run, once per process."""
    path = os.path.abspath(os.environ.get("CELL_TIMES", "cell_times.tsv"))
    client, run = nbclient.NotebookClient, nbmake.nb_run.NotebookRun
    if not hasattr(client.async_execute_cell, "__wrapped__"):
        client.async_execute_cell = _timed(client.async_execute_cell, path)
        run.execute = _named(run.execute)


def summary(path: str, slowest: int = 3) -> str:
    """Markdown: per notebook, its slowest finished cells (with the error's name where one failed or was
    stopped) and any cell that started and never ended."""
    finished, started = collections.defaultdict(dict), collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            notebook, index, what, first, error = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
            if what == "started":
                started[notebook][int(index)] = first
            else:
                finished[notebook][int(index)] = (float(what), first, error)
    rows = ["| chapter | cell | seconds | first line |", "|---|---|---|---|"]
    for notebook in sorted(set(started) | set(finished)):
        for index in sorted(set(started[notebook]) - set(finished[notebook])):
            rows.append(f"| {notebook} | {index} | **not finished** | `{started[notebook][index]}` |")
        cells = sorted(finished[notebook].items(), key=lambda item: -item[1][0])[:slowest]
        for index, (seconds, first, error) in cells:
            rows.append(
                f"| {notebook} | {index} | {seconds:.1f}{f' ({error})' if error else ''} | `{first}` |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
