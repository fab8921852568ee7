#!/usr/bin/env python3
"""Symbols that callgrind profiles executed in the profiled binaries, one per line, in groups:
the symbols of the first group's profiles, hottest first (by the instructions each executed
itself, summed over the group), then those of the next group that are not listed yet, and so
on. A profile counts only its own binary's code (the `ob=` its command line names).
usage: hot_symbols.py CALLGRIND_OUT... [-- CALLGRIND_OUT...]..."""
import collections
import re
import sys

NAME = re.compile(r"\((\d+)\)(?: (.*))?")


def self_costs(path, obj, total):
    """Adds the self instructions of `obj`'s functions in one callgrind file to `total`."""
    names = {"ob": {}, "fn": {}}
    ob = fn = None
    after_calls = False

    def resolve(table, value):
        m = NAME.match(value)
        if not m:
            return value
        if m.group(2) is not None:
            names[table][m.group(1)] = m.group(2)
        return names[table].get(m.group(1))

    with open(path, errors="replace") as f:
        for line in f:
            if "=" in line[:6] and line[0].isalpha():
                key, value = line.rstrip("\n").split("=", 1)
                if key == "ob":
                    ob = resolve("ob", value)
                elif key == "cob":
                    resolve("ob", value)
                elif key in ("fn", "cfn"):
                    name = resolve("fn", value)
                    if key == "fn":
                        fn = name
                elif key == "calls":
                    after_calls = True
                continue
            if not line[:1] or line[0] not in "0123456789+-*":
                continue
            if after_calls:  # the inclusive cost of a call, not this function's own
                after_calls = False
                continue
            parts = line.split()
            if len(parts) >= 2 and ob == obj and fn:
                total[fn] += int(parts[1])


def profiled_binary(path):
    """The program a callgrind file profiled (its `cmd:` line's first word)."""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("cmd:"):
                return line.split()[1]
    sys.exit(f"{path}: no cmd: line")


def main():
    groups, group = [], []
    for arg in sys.argv[1:]:
        if arg == "--":
            groups.append(group)
            group = []
        else:
            group.append(arg)
    groups.append(group)
    listed = set()
    for files in groups:
        total = collections.Counter()
        for path in files:
            self_costs(path, profiled_binary(path), total)
        for name, _ in total.most_common():
            # Only linkable names: valgrind writes "0x..." for code without a symbol.
            if name not in listed and re.fullmatch(r"[A-Za-z_.$][A-Za-z0-9_.$]*", name):
                listed.add(name)
                print(name)


if __name__ == "__main__":
    main()
