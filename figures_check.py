"""Reads the figures' numbers back: every run a figure counts has its record, the record says
what the figure says, and every "mean (min–max)" quoted in the text is in a table.

Concern: checking, never writing. Three checks, each a list of problems (none: exit 0):

* **records**: each run a figure's results.json counts (``runs``) has its record committed
  (args.json, log.jsonl, eval.json, DONE.json: arguments, curve, final NN / LP, command line;
  its commit is the one that added it) and the record's final NN / LP and k-NN curve are the
  figure's; the runs listed as ``lost`` are counted.
* **tables**: each figure's table.md is what figures_tables.py makes from the records now.
* **text**: each number quoted in README.md and docs/figures.md as "m (a–b)" (a mean or a
  median and its range over seeds) or "m×" appears in a committed table.md, and each
  Markdown table copied into docs/figures.md is a committed table.md's, line for line.

    python figures_check.py                 # all three, on figs/ and the docs
    python figures_check.py records         # one of them
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import figures_tables
from figures_runs import ROOT, read_eval, read_run

TEXTS = ("README.md", os.path.join("docs", "figures.md"))
TRIPLE = re.compile(r"[−+-]?\d+\.\d (\((?:n\.r\.|[−+-]?\d+\.\d)(?:–| to )[−+-]?\d+\.\d\))")


RECORD = ("args.json", "log.jsonl", "eval.json", "DONE.json")


def tracked():
    """The files git tracks under the repository (relative paths), or None outside git."""
    try:
        return set(subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.split("\0"))
    except (OSError, subprocess.CalledProcessError):
        return None


def check_records(out):
    """(problems, counted, lost): runs without a committed record (args, curve, evaluation,
    command line) or whose record disagrees with the figure."""
    problems, counted, lost, files = [], 0, 0, tracked()
    for folder in figures_tables.figure_folders(out):
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        rows = results.items() if isinstance(results, dict) else []
        for name, row in rows:
            if not isinstance(row, dict) or "runs" not in row:
                continue
            lost += len(row.get("lost", []))
            for i, run in enumerate(row["runs"]):
                counted += 1
                where = f"{os.path.relpath(folder, ROOT)} '{name}' {run}"
                if not figures_tables.has_record(run):
                    problems.append(f"{where}: counted, no record")
                    continue
                rel = os.path.relpath(figures_tables.at(run), ROOT)
                if files is not None and any(os.path.join(rel, f) not in files for f in RECORD):
                    problems.append(f"{where}: its record ({', '.join(RECORD)}) is not all "
                                    "committed")
                nn, lp = read_eval(figures_tables.at(run))
                if (row["nn"]["values"][i], row["lp"]["values"][i]) != (nn, lp):
                    problems.append(f"{where}: the figure says NN / LP "
                                    f"{row['nn']['values'][i]:.2f} / {row['lp']['values'][i]:.2f}"
                                    f", the record {nn:.2f} / {lp:.2f}")
                curve = [list(c) for c in read_run(figures_tables.at(run))["curve"]]
                if "curves" in row and [list(c) for c in row["curves"][i]] != curve:
                    problems.append(f"{where}: the figure's k-NN curve is not the record's")
    return problems, counted, lost


def check_tables(out):
    """Figures whose table.md is not what their records make now."""
    problems = []
    tmp = tempfile.mkdtemp()
    draw = figures_tables.plots.pyplot
    figures_tables.plots.pyplot = lambda note="": None            # tables only
    try:
        for folder in figures_tables.figure_folders(out):
            copy = os.path.join(tmp, os.path.relpath(folder, ROOT))
            shutil.copytree(folder, copy)
            text = figures_tables.render(copy, quiet=True)
            with open(os.path.join(folder, "table.md")) as f:
                if f.read() != text + "\n":
                    problems.append(f"{os.path.relpath(folder, ROOT)}/table.md differs from "
                                    "what its records make (python figures.py tables)")
    finally:
        figures_tables.plots.pyplot = draw
        shutil.rmtree(tmp)
    return problems


def table_text(out):
    """Every committed table.md, as one text."""
    text = ""
    for folder in figures_tables.figure_folders(out):
        with open(os.path.join(folder, "table.md")) as f:
            text += f.read()
    return text


def normal(s):
    """A number as the tables print it: '−0.4' → '-0.4', '+3.2' → '3.2', ' to ' → '–'."""
    return s.replace("−", "-").replace(" to ", "–").lstrip("+")


def check_text(out, texts=TEXTS):
    """Numbers quoted in ``texts`` that no committed table holds; tables copied into a
    text that are no table.md's."""
    tables = normal(table_text(out))
    cells = {normal(c.strip()) for line in tables.splitlines() if line.startswith("|")
             for c in line.split("|")}
    problems = []
    for name in texts:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for m in TRIPLE.finditer(text):
            quoted = normal(m.group(0))
            if quoted not in tables and not any(quoted in c for c in cells):
                problems.append(f"{name}: '{m.group(0)}' is in no table")
        for block in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
            if block.startswith("| run |") or block.startswith("| budget |"):
                if block not in table_text(out):
                    problems.append(f"{name}: a copied table is no table.md's: "
                                    f"{block.splitlines()[2][:60]} …")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", nargs="?", default="all", choices=["all", "records", "tables",
                                                                 "text"])
    ap.add_argument("--out", default=os.path.join(ROOT, "figs"), help="the figures' parent folder")
    args = ap.parse_args(argv)
    problems = []
    if args.check in ("all", "records"):
        found, counted, lost = check_records(args.out)
        print(f"records: {counted} runs counted by the figures, {len(found)} problems; "
              f"{lost} runs listed as lost (not counted)")
        problems += found
    if args.check in ("all", "tables"):
        found = check_tables(args.out)
        print(f"tables: {len(figures_tables.figure_folders(args.out))} figures re-derived, "
              f"{len(found)} differ")
        problems += found
    if args.check in ("all", "text"):
        found = check_text(args.out)
        print(f"text: {len(found)} numbers or tables in {', '.join(TEXTS)} not in the tables")
        problems += found
    for p in problems:
        print("  " + p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
