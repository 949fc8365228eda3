"""Writes OUT/Recipes.java from the java blocks of docs/drivers.md (in the
order of the document): their imports first, then their members inside
`final class Recipes`, each after a comment naming its block and line.

Usage: make_java.py SNIPPETS OUT"""
import json
import os
import sys

snippets, out = sys.argv[1], sys.argv[2]
with open(os.path.join(snippets, "manifest.json"), encoding="utf-8") as f:
    java = [b for b in json.load(f) if b["info"] == "java"]
imports, members = [], []
for b in java:
    with open(os.path.join(snippets, b["name"] + ".txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    members.append(f"    // docs/drivers.md:{b['line']} (block {b['name']})")
    for line in lines:
        if line.startswith("import "):
            if line not in imports:
                imports.append(line)
        else:
            members.append("    " + line if line else "")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "Recipes.java"), "w", encoding="utf-8") as f:
    f.write("\n".join(imports) + "\n\n// The java blocks of docs/drivers.md, as members of one class.\n"
            "final class Recipes {\n" + "\n".join(members) + "\n}\n")
print(f"{len(java)} java blocks: {', '.join(b['name'] for b in java)}")
