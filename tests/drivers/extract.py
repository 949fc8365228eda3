#!/usr/bin/env python3
"""Extracts the code blocks of docs/drivers.md for the runners.

Every fenced code block of the document must be marked, on the line right
before its opening fence, with

    <!-- test: NAME -->

NAME (lowercase letters, digits and dashes) is unique in the document.
Writes OUT/NAME.txt (the block's code) and OUT/manifest.json (name, info
string, first line of code in the document, section) for the runners, which
load blocks by name. Exits non-zero, saying why, when a block has no marker,
a marker is not followed by a block, a name repeats, or the document has an
unclosed fence. test.sh then checks that some runner ran every block.

Usage: extract.py DOC OUT
"""
import json
import os
import re
import sys

MARKER = re.compile(r"^<!--\s*test:\s*([a-z0-9][a-z0-9-]*)\s*-->\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def extract(text):
    lines = text.split("\n")
    blocks, errors = [], []
    section = ""
    pending = None  # (name, line) of a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("## "):
            section = line[3:].strip()
        marker = MARKER.match(line)
        if marker:
            if pending:
                errors.append(f"line {pending[1]}: marker '{pending[0]}' is not followed by a code block")
            pending = (marker.group(1), i + 1)
            i += 1
            continue
        if fence:
            ticks, info = fence.group(1), fence.group(2)
            start = i + 1
            j = start
            while j < len(lines) and not (lines[j].strip().startswith(ticks) and lines[j].strip().strip(ticks[0]) == ""):
                j += 1
            if j == len(lines):
                errors.append(f"line {i + 1}: unclosed code fence")
                break
            code = "\n".join(lines[start:j]) + "\n"
            if pending and pending[1] == i:  # the marker is the line right before the fence
                blocks.append({"name": pending[0], "info": info, "line": start + 1,
                               "section": section, "code": code})
            else:
                errors.append(f"line {i + 1}: a code block without a '<!-- test: NAME -->' marker "
                              f"on the line before it (section '{section}'): every snippet must be run")
                if pending:
                    errors.append(f"line {pending[1]}: marker '{pending[0]}' is not right before a code block")
            pending = None
            i = j + 1
            continue
        if pending and line.strip() and pending[1] != i + 1:
            errors.append(f"line {pending[1]}: marker '{pending[0]}' is not right before a code block")
            pending = None
        i += 1
    if pending:
        errors.append(f"line {pending[1]}: marker '{pending[0]}' is not followed by a code block")
    seen = set()
    for b in blocks:
        if b["name"] in seen:
            errors.append(f"line {b['line']}: the name '{b['name']}' is used twice")
        seen.add(b["name"])
    return blocks, errors


def main():
    doc, out = sys.argv[1], sys.argv[2]
    with open(doc, encoding="utf-8") as f:
        blocks, errors = extract(f.read())
    for e in errors:
        print(f"{doc}: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    for b in blocks:
        with open(os.path.join(out, b["name"] + ".txt"), "w", encoding="utf-8") as f:
            f.write(b["code"])
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump([{k: v for k, v in b.items() if k != "code"} for b in blocks], f, indent=1)
    print(f"{len(blocks)} code blocks in {doc}")


if __name__ == "__main__":
    main()
