#!/usr/bin/env python3
"""Import cycles between the source files of a Rust crate.

An edge A -> B is any `crate::…` or `super::…` path in file A (in `use` trees, including
nested braces, and inline in code) that names an item of file B: the path is resolved to the
longest prefix that is a module file. Edges from a file to its own parent module file, or from
a module file to its direct children, are left out. `super::` inside an inline `mod x { … }`
(such as `mod tests`) is resolved from that inline module.

Prints the edges that take part in cycles, the strongly connected components (each is one or
more cycles) and every elementary cycle (up to --max-cycles).

    python3 scripts/import_cycles.py [src] [--max-cycles N]

Also prints the cycles between top-level modules (`crate::x`, all its files together; the
crate root is `lib`), which the file-level count can miss (a module importing a file of
another that imports its parent).
"""

import os
import re
import sys


def module_files(src):
    """Maps module path tuples to file paths (relative to src)."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)
            parts = rel[:-3].split(os.sep)
            if parts == ["main"] or parts[:1] == ["bin"]:
                continue  # binary crate roots: their `crate::` is another crate
            if parts == ["lib"]:
                parts = ["mod"]
            if parts[-1] == "mod":
                parts = parts[:-1]
            mods[tuple(parts)] = rel
    return mods


def strip_comments_and_strings(text):
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append(" " * 0)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            out.append('""')
            i = n if j < 0 else j + len(end)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or (c == "'" and re.match(r"'\\[xu]", text[i:i + 3])):
            j = text.find("'", i + 2)
            out.append("' '")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = tree.strip()
    depth = 0
    for k, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix = tree[:k]
                inner = tree[k + 1:tree.rfind("}")]
                items, cur, d = [], "", 0
                for ch2 in inner:
                    if ch2 == "," and d == 0:
                        items.append(cur)
                        cur = ""
                        continue
                    d += ch2 == "{"
                    d -= ch2 == "}"
                    cur += ch2
                items.append(cur)
                res = []
                for it in items:
                    it = it.strip()
                    if not it:
                        continue
                    if it == "self":
                        res.append(prefix.rstrip(":"))
                    else:
                        res.extend(prefix + p for p in expand_use_tree(it))
                return res
            depth += 1
    return [re.sub(r"\s+as\s+\w+$", "", tree)]


def paths_in(text):
    """(path string, offset) for every use tree and inline crate::/super:: path."""
    found = []
    use_spans = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        use_spans.append((m.start(), m.end()))
        for p in expand_use_tree(m.group(1)):
            p = re.sub(r"\s+", "", p)
            if p.startswith(("crate::", "super::", "self::")):
                found.append((p, m.start()))
    for m in re.finditer(r"(?<![\w:])((?:crate|super)(?:::(?:super|\w+))*)", text):
        if any(a <= m.start() < b for a, b in use_spans):
            continue
        found.append((m.group(1), m.start()))
    return found


def inline_modules(text):
    """(start, end, name) of inline `mod name { … }` blocks, by brace matching."""
    spans = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += text[i] == "{"
            depth -= text[i] == "}"
            i += 1
        spans.append((m.start(), i, m.group(1)))
    return spans


def resolve(path, here, mods):
    parts = path.split("::")
    if parts[0] == "crate":
        base, rest = [], parts[1:]
    else:
        base, rest = list(here), parts
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    full = base + [p for p in rest if p not in ("*",)]
    for k in range(len(full), -1, -1):
        if tuple(full[:k]) in mods:
            return tuple(full[:k])
    return None


def graph(src):
    mods = module_files(src)
    edges = {}
    for mod, rel in mods.items():
        text = strip_comments_and_strings(open(os.path.join(src, rel), encoding="utf-8").read())
        inl = inline_modules(text)
        for p, off in paths_in(text):
            here = list(mod)
            for a, b, name in sorted(inl):
                if a <= off < b:
                    here.append(name)
            target = resolve(p, here, mods)
            if target is None or target == mod:
                continue
            if target == mod[:-1] and len(mod) > 0:  # own parent
                continue
            if target[:-1] == mod and len(target) == len(mod) + 1:  # own child
                continue
            edges.setdefault(mod, set()).add(target)
    return mods, edges


def sccs(nodes, edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def cycles(comp, edges, limit):
    """Elementary cycles within one component (each reported once, from its smallest node)."""
    comp_set = set(comp)
    res = []
    for start in sorted(comp):
        def dfs(v, path, seen):
            if len(res) >= limit:
                return
            for w in sorted(edges.get(v, ())):
                if w not in comp_set or w < start:
                    continue
                if w == start:
                    res.append(path[:])
                elif w not in seen:
                    seen.add(w)
                    path.append(w)
                    dfs(w, path, seen)
                    path.pop()
                    seen.discard(w)
        dfs(start, [start], {start})
    return res


def main():
    args = [a for a in sys.argv[1:]]
    limit = 200
    if "--max-cycles" in args:
        k = args.index("--max-cycles")
        limit = int(args[k + 1])
        del args[k:k + 2]
    src = args[0] if args else "src"
    mods, edges = graph(src)
    name = lambda m: mods[m]
    comps = sccs(list(mods), edges)
    total = 0
    print(f"{len(mods)} files, {sum(len(v) for v in edges.values())} edges between them")
    print(f"{len(comps)} strongly connected component(s) with cycles")
    for comp in comps:
        print()
        print("component: " + ", ".join(name(m) for m in comp))
        cs = cycles(comp, edges, limit)
        total += len(cs)
        for c in cs:
            print("  cycle: " + " -> ".join(name(m) for m in c + [c[0]]))
        if len(cs) >= limit:
            print(f"  (stopped at {limit} cycles)")
    print()
    print(f"{total} elementary cycle(s)")
    top = {}
    for a, bs in edges.items():
        for b in bs:
            ta, tb = (a[:1] or ("lib",))[0], (b[:1] or ("lib",))[0]
            if ta != tb:
                top.setdefault(ta, set()).add(tb)
    nodes = set(top) | {x for v in top.values() for x in v}
    top_comps = sccs(nodes, top)
    print(f"top-level module cycles: {len(top_comps)} component(s)")
    for comp in top_comps:
        print("  component: " + ", ".join(comp))
        for c in cycles(comp, top, limit):
            print("    cycle: " + " -> ".join(c + [c[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
