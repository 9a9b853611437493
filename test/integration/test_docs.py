"""Documented commands run as written (issue #15: `bench/submit --quick`, as
the README wrote it, once said "Permission denied").

  * every file under bench/, demo/ and test/ that starts with "#!" is
    executable: mode 100755 in git (`git ls-files -s`) when the tree is a
    git checkout, else on disk (test/run-all runs the suite in a copy of a
    clean clone without .git; the copy keeps the modes git gave the files);
  * every command README.md and docs/*.md show as a repository path, in a
    fenced shell block (`demo/run`, `test/run-all`) or in inline code
    (`bench/ingest [N]`, `SUITES="regress unit" test/run-all`, a lone
    `bench/submit`), exists and is executable;
  * every relative markdown link in them resolves to a file, and its
    #anchor, if any, to a heading of that file (GitHub's anchors);
  * the benchmark tables between <!-- bench:NAME --> markers are those of
    bench/results/NAME.md (`bench/update-docs --check`).

The checks are functions of the tree's root, so the test can also show that
they catch what they are for, on a small tree made for it.

No database needed; runs with the integration tests (test/run-tests).
"""

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT_DIRS = ("bench", "demo", "test")
# generated, not part of the tree (.gitignore)
SKIP_DIRS = {"__pycache__", ".pytest_cache", "out", "build"}


def doc_files(root):
    docs = os.path.join(root, "docs")
    names = sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md")) \
        if os.path.isdir(docs) else []
    return ["README.md"] + names


# ---- run bits -------------------------------------------------------------------

def tracked_modes(root):
    """{path: mode} of the files under SCRIPT_DIRS: git's modes in a
    checkout, else the files' own."""
    if os.path.exists(os.path.join(root, ".git")):  # a file in a worktree
        out = subprocess.run(["git", "-C", root, "ls-files", "-s", "--", *SCRIPT_DIRS],
                             capture_output=True, text=True, check=True).stdout
        modes = {}
        for line in out.splitlines():
            meta, path = line.split("\t", 1)
            modes[path] = int(meta.split()[0], 8)
        return modes
    modes = {}
    for top in SCRIPT_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for f in filenames:
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    modes[os.path.relpath(p, root)] = \
                        0o100755 if st.st_mode & stat.S_IXUSR else 0o100644
    return modes


def scripts_without_run_bit(root):
    bad = []
    for path, mode in sorted(tracked_modes(root).items()):
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            continue  # deleted in the work tree
        with open(full, "rb") as f:
            if f.read(2) == b"#!" and mode != 0o100755:
                bad.append("%s (mode %o)" % (path, mode))
    return bad


# ---- documented commands --------------------------------------------------------

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")
NOT_SHELL = {"sql", "json", "text", "diff", "python", "c"}


def split_words(text):
    try:
        return shlex.split(text, comments=True)
    except ValueError:          # an apostrophe in prose-like code
        return text.split()


def command_word(words):
    """The command of a simple command: past sudo/env and NAME=value words."""
    for w in words:
        if w in ("sudo", "env", "exec", "time") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w):
            continue
        return w
    return None


def repo_path(word, root):
    """word, if it names a path inside the repository (first component an
    existing top-level directory, no placeholder), else None."""
    if not word or "/" not in word or word.startswith(("/", "~", "-")) or re.search(r"[<>$*:]", word):
        return None
    word = word[2:] if word.startswith("./") else word
    top = word.split("/", 1)[0]
    if top in ("", "..") or not os.path.isdir(os.path.join(root, top)):
        return None
    return word


def documented_commands(root):
    """(file, command path) for every command the docs show as a
    repository path."""
    found = []
    for doc in doc_files(root):
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            text = f.read()
        # fenced blocks: each line (and each part of a && ; | chain) of a
        # shell or untyped block is a command line
        for m in FENCE.finditer(text):
            if m.group(1).strip().lower() in NOT_SHELL:
                continue
            for line in m.group(2).splitlines():
                for part in re.split(r"&&|\|\||;|\|", line):
                    p = repo_path(command_word(split_words(part)), root)
                    if p:
                        found.append((doc, p))
        # inline code outside the fenced blocks: a repository path followed by
        # arguments, or a lone path without an extension under bench/, demo/,
        # test/ or .ci/ (`bench/submit`, `demo/run`; `src/http.c` names a file)
        prose = FENCE.sub("", text)
        for m in INLINE.finditer(prose):
            words = split_words(m.group(1).replace("\n", " "))
            cmd = command_word(words)
            p = repo_path(cmd, root)
            if not p or p.endswith("/"):
                continue
            lone = len(words) == 1
            if lone and not (p.split("/", 1)[0] in SCRIPT_DIRS + (".ci",)
                             and "." not in os.path.basename(p)):
                continue
            found.append((doc, p))
    return found


def commands_not_runnable(root):
    bad = []
    for doc, p in documented_commands(root):
        full = os.path.join(root, p)
        if not os.path.isfile(full):
            bad.append("%s: %s does not exist" % (doc, p))
        elif not os.access(full, os.X_OK):
            bad.append("%s: %s is not executable" % (doc, p))
    return sorted(set(bad))


# ---- links ----------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(path):
    """GitHub's heading anchors of a markdown file: lower case, punctuation
    but - and _ dropped, spaces to -, repeats numbered -1, -2, ..."""
    seen, out = {}, set()
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else "%s-%d" % (slug, n))
    return out


def broken_links(root):
    bad = []
    for doc in doc_files(root):
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            text = INLINE.sub("``", FENCE.sub("", f.read()))
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # https:, mailto:
            path, _, frag = target.partition("#")
            full = os.path.normpath(os.path.join(root, os.path.dirname(doc), path)) if path \
                else os.path.join(root, doc)
            if not os.path.exists(full):
                bad.append("%s: %s: no such file" % (doc, target))
            elif frag and (not full.endswith(".md") or frag not in anchors(full)):
                bad.append("%s: %s: no such heading" % (doc, target))
    return bad


# ---- the tests ------------------------------------------------------------------

def test_scripts_have_their_run_bit():
    assert scripts_without_run_bit(ROOT) == []


def test_documented_commands_exist_and_run():
    cmds = {p for _, p in documented_commands(ROOT)}
    # the parser finds the commands the README is about
    assert {"demo/run", "test/run-all"} <= cmds, cmds
    assert commands_not_runnable(ROOT) == []


def test_relative_links_resolve():
    assert broken_links(ROOT) == []


def test_benchmark_tables_come_from_bench_results():
    script = os.path.join(ROOT, "bench", "update-docs")
    if not os.path.exists(script):
        pytest.skip("no bench/update-docs")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A small tree without .git: a script without its run bit, a documented
    command that is missing or not executable, a broken link and anchor."""
    root = str(tmp_path)
    for d in ("bench", "demo", "docs", "src"):
        os.mkdir(os.path.join(root, d))

    def write(path, text, mode=0o644):
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
        os.chmod(os.path.join(root, path), mode)

    write("bench/submit", "#!/bin/sh\n")                    # no run bit
    write("bench/ok", "#!/bin/sh\n", 0o755)
    write("bench/data.csv", "a,b\n")                        # not a script
    write("demo/run", "#!/bin/sh\n", 0o755)
    write("src/x.c", "int x;\n")
    write("README.md", "# T\n\n## Some part\n\n```sh\ndemo/run   # the demo\n"
          "sudo X=1 bench/missing --flag && make -C src\n```\n\n"
          "Run `bench/submit --quick` or `bench/ok`; see `src/x.c` and `bench/nothing.py`.\n"
          "[ok](docs/a.md#a-heading) [bad](docs/b.md) [bad anchor](#no-part) [good](#some-part)"
          " [web](https://example.com/x)\n")
    write("docs/a.md", "# A heading\n\n[back](../README.md#some-part) [no](../README.md#nope)\n")

    assert scripts_without_run_bit(root) == ["bench/submit (mode 100644)"]
    assert sorted(p for _, p in documented_commands(root)) == \
        ["bench/missing", "bench/ok", "bench/submit", "demo/run"]
    assert commands_not_runnable(root) == ["README.md: bench/missing does not exist",
                                           "README.md: bench/submit is not executable"]
    assert broken_links(root) == ["README.md: docs/b.md: no such file",
                                  "README.md: #no-part: no such heading",
                                  "docs/a.md: ../README.md#nope: no such heading"]
