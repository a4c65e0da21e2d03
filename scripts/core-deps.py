#!/usr/bin/env python3
"""Checks that src/core has no import cycle, between files or between capability folders.

Reads every `crate::core::...` and `super::...` path in code (not in comments, and not in
`#[cfg(test)] mod tests`: a test may use a sibling freely), maps it to the file that defines the module, and fails on any cycle.
It also checks that nothing in src/core names proxy_wasm. `make lint` runs it; `--graph` prints
the folder-level graph that docs/architecture.md draws.
"""
import glob
import re
import sys

ROOT = "src/core/"


def module_of(path):
    parts = path[len(ROOT):-3].split("/")
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def main():
    modules = {module_of(f): f for f in glob.glob(ROOT + "**/*.rs", recursive=True)}
    graph, errors = {}, []
    for mod, path in modules.items():
        text = open(path, encoding="utf-8").read()
        if "proxy_wasm" in text:
            errors.append(f"{path} names proxy_wasm: the core must not know the host")
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        # Comments, doc links included, name modules without depending on them.
        text = "\n".join(line.split("//")[0] for line in text.splitlines())
        deps = set()
        for found in re.findall(r"crate::core::([a-z_:]+)", text):
            parts = found.split("::")
            for k in range(len(parts), 0, -1):
                if "::".join(parts[:k]) in modules:
                    deps.add("::".join(parts[:k]))
                    break
        parent = mod.split("::")[:-1]
        for name in re.findall(r"\bsuper::([a-z_]+)", text):
            dep = "::".join(parent + [name])
            if dep in modules:
                deps.add(dep)
        deps.discard(mod)
        graph[mod] = deps

    def cycle_from(start, g):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in sorted(g.get(node, ())):
                if dep == start:
                    return trail + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
        return None

    folders = {}
    for mod, deps in graph.items():
        for dep in deps:
            a, b = mod.split("::")[0], dep.split("::")[0]
            if a != b:
                folders.setdefault(a, set()).add(b)
    for g in (graph, folders):
        for node in sorted(g):
            trail = cycle_from(node, g)
            if trail:
                errors.append("import cycle: " + " -> ".join(trail))
                break
    if "--graph" in sys.argv:
        for mod in sorted(folders):
            print(f"{mod} -> {', '.join(sorted(folders[mod]))}")
    for e in errors:
        print("core-deps:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
