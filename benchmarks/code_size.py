"""The size and shape of train_gpt.py: the counted bytes (its packed form), lines per section, lines over 120
characters, functions over 60 lines, and the attributes its phases set on the run.

    python3 benchmarks/code_size.py                      # this checkout's train_gpt.py
    python3 benchmarks/code_size.py --source old.py      # another version, e.g. from `git show <commit>:train_gpt.py`
"""

import argparse
import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402  (the packer that counts the code)

BANNER = re.compile(r"^# =+\n# ([A-Z][A-Z' /]+)\n# =+$", re.M)


def section_lines(source):
    """[(section, lines)] in file order, the preamble first."""
    starts = [(0, "preamble")] + [(source.count("\n", 0, m.start()), m.group(1).strip())
                                  for m in BANNER.finditer(source)]
    total = source.count("\n")
    ends = [first for first, _ in starts[1:]] + [total]
    return [(name, end - first) for (first, name), end in zip(starts, ends)]


def run_attributes(tree, source):
    """(all attributes of the Run object, those set outside Run.__init__)."""
    assigned = set()
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AugAssign) else [])
        for target in targets:
            for item in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.value.id == "run":
                    assigned.add(item.attr)
    run_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Run")
    in_init = set(re.findall(r"self\.([a-z_]+)\s*[,=]", ast.get_source_segment(source, run_class)))
    return assigned | in_init, assigned - in_init


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parent.parent / "train_gpt.py"))
    source = Path(parser.parse_args().source).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    packed, compressor, _ = T.pack_source(source.encode("utf-8"))
    print(f"counted_bytes:{len(packed)} ({compressor}) source_bytes:{len(source.encode('utf-8'))} lines:{len(lines)} "
          f"over_120:{sum(len(line) > 120 for line in lines)} over_100:{sum(len(line) > 100 for line in lines)}")
    for name, count in section_lines(source):
        print(f"  {name:<24} {count:5d} lines {100 * count / len(lines):4.0f}%")
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    print(f"functions_over_60_lines: {' '.join(f'{name}:{count}' for name, count in long) or 'none'}")
    for name in ("Hyperparameters", "train"):
        node = next(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
        print(f"{name}: {node.end_lineno - node.lineno + 1} lines")
    every, outside = run_attributes(tree, source)
    print(f"run_attributes: {len(every)} ({len(outside)} set outside Run.__init__: {' '.join(sorted(outside))})")


if __name__ == "__main__":
    main()
